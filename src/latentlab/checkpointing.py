"""Checkpoints that survive being killed, and resuming that refuses what it cannot trust.

- `AtomicCheckpointIO`: every checkpoint is streamed into a temporary file next to its target,
  fsync'ed and moved into place with `os.replace`, so a SIGKILL (or a full disk) during a save leaves
  the previous complete `last.ckpt`, never half of a new one. It also refuses to write a checkpoint
  holding NaN/inf anywhere (weights, optimiser moments, ALMOND's chains): a diverged model never
  replaces the last good one.
- `PeriodicCheckpoint`: writes `checkpoints/last.ckpt` every `every_n_epochs` epochs (but not sooner than
  `min_interval_s` after the last write, so that short epochs do not spend their time on checkpoints) and/or
  every `every_n_train_steps` optimiser steps (both may be on), and once more when training ends; and keeps
  `checkpoints/epoch=N.ckpt` after the epochs listed in `snapshot_epochs` (e.g. the end of ALMOND's warm-up).
- `RandomState`: Lightning does not checkpoint the global torch/numpy/python random states, yet the
  shuffle order and the reparameterisation noise come from them; this callback saves and restores
  them, so a resumed run (at any step) continues exactly as the uninterrupted run would.
- `PeriodicCheckpoint` also writes it when the run is preempted (SIGTERM), at the current step (a SIGTERM
  during a validation inside fit waits for the validation to end, so no half-validated state is saved).
- Reading (`latentlab.checkpoint_loading`, re-exported here): `resolve_ckpt_path` /
  `load_checkpoint_safely` / `check_resume_checkpoint`: `ckpt_path=last`, and a clear `CheckpointError`
  for a missing, truncated, foreign, other-method or other-version checkpoint.

Safe loading: checkpoints are read with `torch.load(weights_only=True)` (tensors and plain
containers only; no code in a checkpoint runs). Unpickling arbitrary objects is an explicit opt-in
(`ckpt_weights_only=false` in `latentlab-train`), for checkpoints you wrote yourself and trust.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Checkpoint

from latentlab.checkpoint_loading import iter_tensors, nonfinite_entries
from latentlab.errors import ConfigError, NumericalError
from latentlab.files import atomic_file

log = logging.getLogger("latentlab")

LAST = "last.ckpt"
TMP_SUFFIX = ".tmp"


# ----- writing ------------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); harmless where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete temporary files left by a save that was killed (they are never valid checkpoints)."""
    directory = Path(directory)
    stale = sorted(directory.glob(f".*.ckpt.*{TMP_SUFFIX}")) if directory.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d partial checkpoint file(s) left by an interrupted save in %s", len(stale), directory)
    return stale


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into a temp file in the target's directory, fsync, `os.replace`: all or nothing.

    Lightning's default serialises the whole checkpoint into memory first and commits without fsync;
    streaming to disk keeps peak memory at one copy and fsync makes the file survive a power cut, not
    only a killed process. `check_finite`: refuse (NumericalError) a checkpoint with NaN/inf tensors.
    """

    def __init__(self, check_finite: bool = True) -> None:
        super().__init__()
        self.check_finite = bool(check_finite)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if self.check_finite and (bad := nonfinite_entries(checkpoint)):
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise NumericalError(f"refusing to write checkpoint {path} at training step {checkpoint.get('global_step')}: "
                                 f"non-finite values in {shown}")
        if not _is_local_file_protocol(str(path)):  # remote storage: fsspec's own transactional write
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(target, suffix=TMP_SUFFIX) as fh:
            torch.save(checkpoint, fh)
        _fsync_dir(target.parent)


class PeriodicCheckpoint(Checkpoint):
    """Write `dirpath/last.ckpt` every `every_n_epochs` epochs and every `every_n_train_steps` optimiser
    steps (0 turns a trigger off; both may be on), and at the end of training.

    Unlike Lightning's ModelCheckpoint (whose epoch and step triggers exclude each other, and which
    with `save_top_k=0` writes `last.ckpt` only when training ends) this keeps one file, always the
    newest state, which is what resuming after a kill needs. Steps count optimiser steps
    (`trainer.global_step`), which methods with two optimisers (AVB) advance twice per batch.
    `min_interval_s`: an epoch's write is skipped when the last one is more recent than this (rank 0's clock decides
    for all ranks), which bounds the cost: a 0.3 s write every 30 s or more is at most 1% of a run; a kill loses at
    most max(one epoch, min_interval_s) of training. SIGTERM and the end of training always write.
    `snapshot_epochs`: after these many epochs (counted from 1) also keep `epoch=N.ckpt`, never overwritten.
    """

    def __init__(self, dirpath: str | Path, every_n_epochs: int = 1, every_n_train_steps: int = 0,
                 save_on_train_end: bool = True, snapshot_epochs: Sequence[int] = (), min_interval_s: float = 0.0) -> None:
        for key, value in (("every_n_epochs", every_n_epochs), ("every_n_train_steps", every_n_train_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"callbacks.model_checkpoint.{key} must be an integer >= 0 (0: off), got {value!r}")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in snapshot_epochs):
            raise ConfigError(f"callbacks.model_checkpoint.snapshot_epochs must be epoch counts >= 1, got "
                              f"{list(snapshot_epochs)!r}")
        if isinstance(min_interval_s, bool) or not isinstance(min_interval_s, (int, float)) or not min_interval_s >= 0:
            raise ConfigError(f"callbacks.model_checkpoint.min_interval_s must be a number of seconds >= 0, got "
                              f"{min_interval_s!r}")
        self.snapshot_epochs = frozenset(int(n) for n in snapshot_epochs)
        self.min_interval_s = float(min_interval_s)
        self._last_write = time.monotonic()
        self.dirpath = Path(dirpath)
        self.every_n_epochs, self.every_n_train_steps = every_n_epochs, every_n_train_steps
        self.save_on_train_end = bool(save_on_train_end)
        self._last_saved_step = -1
        self._metrics: dict[str, float] = {}
        #: the metrics logged up to the checkpoint a run resumed from (see `metrics_before_resume`)
        self.resumed_metrics: dict[str, float] = {}

    @property
    def last_path(self) -> Path:
        return self.dirpath / LAST

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_epochs=self.every_n_epochs, every_n_train_steps=self.every_n_train_steps)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            remove_stale_temp_files(self.dirpath)

    def _skip(self, trainer: L.Trainer) -> bool:
        return bool(trainer.fast_dev_run) or trainer.sanity_checking or trainer.global_step == self._last_saved_step

    def save(self, trainer: L.Trainer) -> None:
        """Flush the loggers (the logs up to a checkpoint are on disk with it), then write last.ckpt
        (all ranks call this; the strategy writes on rank zero)."""
        from latentlab.builders import scalar_metrics

        for logger in trainer.loggers:
            logger.save()
        self._metrics = scalar_metrics(trainer.callback_metrics)
        trainer.save_checkpoint(self.last_path, weights_only=False)  # full state: optimisers, loops, callbacks
        self._last_saved_step = trainer.global_step
        self._last_write = time.monotonic()

    def _interval_passed(self, trainer: L.Trainer) -> bool:
        """min_interval_s since the last write (or the start of training), by rank 0's clock on every rank."""
        if not self.min_interval_s:
            return True
        passed = time.monotonic() - self._last_write >= self.min_interval_s
        return bool(trainer.strategy.broadcast(passed)) if trainer.world_size > 1 else passed

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sigterm_pending = False
        self._last_write = time.monotonic()
        if trainer.world_size > 1:
            self._record_sigterm_only(trainer)

    def _record_sigterm_only(self, trainer: L.Trainer) -> None:
        """Under DDP, Lightning's SIGTERM handler calls a broadcast from inside the handler, i.e. wherever the main
        thread happened to be: a collective the other ranks do not match, and the gloo ranks deadlock (seen with 2
        processes). This handler only records the signal (and forwards it to the ranks this process launched, as
        Lightning's does); `on_train_batch_end` agrees on it across ranks, so every rank stops at the same batch."""
        def handler(signum: int, frame: Any) -> None:
            if not self._sigterm_pending and trainer.strategy.launcher is not None:
                trainer.strategy.launcher.kill(signum)
            self._sigterm_pending = True

        signal.signal(signal.SIGTERM, handler)  # Lightning restores the original handler at teardown

    def _agree_on_sigterm(self, trainer: L.Trainer) -> None:
        flag = torch.tensor([int(self._sigterm_pending)], device=trainer.strategy.root_device)
        if bool(trainer.strategy.all_gather(flag).any()):
            trainer._signal_connector.received_sigterm = True  # Lightning stops every rank after this batch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.world_size > 1:
            self._agree_on_sigterm(trainer)
        n = self.every_n_train_steps
        # "crossed a multiple of n" rather than "global_step % n == 0": two-optimiser methods step by 2
        if n and not self._skip(trainer) and trainer.global_step // n > max(self._last_saved_step, 0) // n:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        n, done = self.every_n_epochs, trainer.current_epoch + 1
        if done in self.snapshot_epochs and not (trainer.fast_dev_run or trainer.sanity_checking):
            trainer.save_checkpoint(self.dirpath / f"epoch={done}.ckpt", weights_only=False)
        if n and done % n == 0 and not self._skip(trainer) and self._interval_passed(trainer):
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_on_train_end and not self._skip(trainer):
            self.save(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Drop Lightning's Slurm requeue snapshots (`hpc_ckpt_N.ckpt`, written on the requeue signal) once fit is
        done: on Slurm `trainer.test(ckpt_path=None)` loads the newest one, which would test the weights of the
        interrupted step instead of the trained model. A requeued job resumes from last.ckpt (written at the
        same step by the SIGTERM that follows the requeue), so nothing needs them after the fit."""
        if trainer.is_global_zero:
            for path in Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"):
                path.unlink(missing_ok=True)
        trainer.strategy.barrier("latentlab_drop_hpc_checkpoints")

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        # A SIGTERM during a validation inside fit is held until that validation ends: a checkpoint in its
        # middle would resume with part of the validation metrics and its random draws lost. Lightning
        # checks the flag right after this hook and again after the validation, where it stops the run.
        if trainer.received_sigterm and not trainer.sanity_checking and trainer.state.fn == "fit":
            trainer._signal_connector.received_sigterm = False  # Lightning has no public switch for this
            self._held_sigterm = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(self, "_held_sigterm", False):
            trainer._signal_connector.received_sigterm = True
            self._held_sigterm = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Preemption: on SIGTERM Lightning finishes the current batch and raises `SIGTERMException`
        (on every DDP rank at the same batch); write last.ckpt at that step, with the data position and
        the random states, so resuming continues exactly where the uninterrupted run would be."""
        from lightning.pytorch.trainer.states import TrainerFn
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING and not self._skip(trainer):
            self.save(trainer)

    def state_dict(self) -> dict[str, Any]:
        # the metrics logged so far travel with the checkpoint: a run resumed after its last epoch (killed
        # while testing) trains no more, yet must report the final validation metrics like the run it continues
        return {"dirpath": str(self.dirpath), "last_saved_step": self._last_saved_step, "metrics": dict(self._metrics)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_saved_step = int(state_dict.get("last_saved_step", -1))
        self.resumed_metrics = {k: float(v) for k, v in (state_dict.get("metrics") or {}).items()}
        self._metrics = dict(self.resumed_metrics)


# ----- random state -------------------------------------------------------------------------------
def collect_random_state() -> dict[str, Any]:
    """Global torch (CPU and CUDA), numpy and python random states as tensors and plain containers,
    so the checkpoint stays loadable with `weights_only=True` (a numpy array would not be)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": list(internal), "gauss": gauss},
    }


def restore_random_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))


class RandomState(L.Callback):
    """Save the global random states with every checkpoint and restore them on resume.

    The state is captured when the checkpoint is written (end of an epoch: after validation, which
    also draws) and restored when the trainer restores callbacks, before the first training
    training batch of the resumed run (the sanity check in between runs under Lightning's
    `isolate_rng`; the training order is keyed on the epoch and resumes mid-epoch, see
    `latentlab.data.resumable`). Resuming at any step thus replays the uninterrupted run's draws. A run
    resumed after its last epoch trains no more, but Lightning still builds (and draws for) a train
    iterator: the state is restored once more at the end of such a fit, so testing draws as it would
    have right after training.
    """

    def __init__(self) -> None:
        self._restored: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return collect_random_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            restore_random_state(state_dict)
            self._restored = state_dict

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._restored = None  # training went on: the states have moved on legitimately

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._restored is not None:
            restore_random_state(self._restored)
            self._restored = None


from latentlab.checkpoint_loading import (  # noqa: E402 - the reading half, kept importable from here
    check_checkpoint_method,
    check_resume_checkpoint,
    check_state_dict_matches,
    describe_checkpoint,
    keep_csv_history,
    load_checkpoint_safely,
    resolve_ckpt_path,
    version_compatible,
)

__all__ = [
    "LAST", "AtomicCheckpointIO", "PeriodicCheckpoint", "RandomState", "check_checkpoint_method",
    "check_resume_checkpoint", "check_state_dict_matches", "collect_random_state", "describe_checkpoint",
    "iter_tensors", "keep_csv_history", "load_checkpoint_safely", "nonfinite_entries", "remove_stale_temp_files",
    "resolve_ckpt_path", "restore_random_state", "version_compatible",
]
