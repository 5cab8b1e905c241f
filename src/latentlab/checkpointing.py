"""Checkpoints that survive being killed, and resuming that refuses what it cannot trust.

- `AtomicCheckpointIO`: every checkpoint is streamed into a temporary file next to its target,
  fsync'ed and moved into place with `os.replace`, so a SIGKILL (or a full disk) during a save leaves
  the previous complete `last.ckpt`, never half of a new one. It also refuses to write a checkpoint
  holding NaN/inf anywhere (weights, optimiser moments, ALMOND's chains): a diverged model never
  replaces the last good one.
- `PeriodicCheckpoint`: writes `checkpoints/last.ckpt` every `every_n_epochs` epochs and/or every
  `every_n_train_steps` optimiser steps (both may be on), and once more when training ends.
- `RandomState`: Lightning does not checkpoint the global torch/numpy/python random states, yet the
  shuffle order and the reparameterisation noise come from them; this callback saves and restores
  them, so a run resumed at an epoch boundary continues exactly as the uninterrupted run would.
- `resolve_ckpt_path` / `load_checkpoint_safely` / `check_resume_checkpoint`: `ckpt_path=last`, and a
  clear `CheckpointError` for a missing, truncated, foreign, other-method or other-version checkpoint.

Safe loading: checkpoints are read with `torch.load(weights_only=True)` (tensors and plain
containers only; no code in a checkpoint runs). Unpickling arbitrary objects is an explicit opt-in
(`ckpt_weights_only=false` in `latentlab-train`), for checkpoints you wrote yourself and trust.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Checkpoint

import latentlab
from latentlab.errors import CheckpointError, ConfigError, NumericalError

log = logging.getLogger("latentlab")

LAST = "last.ckpt"
TMP_SUFFIX = ".tmp"


# ----- writing ------------------------------------------------------------------------------------
def iter_tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(key path, tensor) for every tensor inside nested dicts/lists/tuples, e.g. `state_dict/encoder.0.weight`."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from iter_tensors(value, f"{path}/{key}" if path else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from iter_tensors(value, f"{path}/{i}")


def nonfinite_entries(checkpoint: Mapping[str, Any]) -> list[str]:
    """Key paths of floating tensors holding NaN or inf (one batched check, then a per-tensor look only on failure)."""
    floats = [(k, t) for k, t in iter_tensors(checkpoint) if t.is_floating_point() and t.numel()]
    if not floats:
        return []
    flags = torch.stack([torch.isfinite(t).all().cpu() for _, t in floats])
    if bool(flags.all()):
        return []
    return [k for (k, _), ok in zip(floats, flags.tolist()) if not ok]


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
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, as open() would give
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)


class PeriodicCheckpoint(Checkpoint):
    """Write `dirpath/last.ckpt` every `every_n_epochs` epochs and every `every_n_train_steps` optimiser
    steps (0 turns a trigger off; both may be on), and at the end of training.

    Unlike Lightning's ModelCheckpoint (whose epoch and step triggers exclude each other, and which
    with `save_top_k=0` writes `last.ckpt` only when training ends) this keeps one file, always the
    newest state, which is what resuming after a kill needs. Steps count optimiser steps
    (`trainer.global_step`), which methods with two optimisers (AVB) advance twice per batch.
    """

    def __init__(self, dirpath: str | Path, every_n_epochs: int = 1, every_n_train_steps: int = 0,
                 save_on_train_end: bool = True) -> None:
        for key, value in (("every_n_epochs", every_n_epochs), ("every_n_train_steps", every_n_train_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"callbacks.model_checkpoint.{key} must be an integer >= 0 (0: off), got {value!r}")
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

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        n = self.every_n_train_steps
        # "crossed a multiple of n" rather than "global_step % n == 0": two-optimiser methods step by 2
        if n and not self._skip(trainer) and trainer.global_step // n > max(self._last_saved_step, 0) // n:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        n = self.every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0 and not self._skip(trainer):
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_on_train_end and not self._skip(trainer):
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
    dataloader iterator of the resumed run draws its shuffle seed (the sanity check in between runs
    under Lightning's `isolate_rng`). Resuming at an epoch boundary thus replays the uninterrupted
    run's draws exactly; a mid-epoch resume restarts that epoch's shuffle (Lightning warns). A run
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


# ----- reading ------------------------------------------------------------------------------------
def resolve_ckpt_path(ckpt_path: str | os.PathLike[str] | None, output_dir: str | Path,
                      search_siblings: bool = True) -> Path | None:
    """`ckpt_path` -> an existing checkpoint file, or None to start fresh.

    `last`: `<output_dir>/checkpoints/last.ckpt` (resume a killed run by rerunning with
    `hydra.run.dir=<its run dir> ckpt_path=last`); if the run directory has none and
    `search_siblings`, the newest `last.ckpt` of the other runs beside it (the same task's runs).
    Anything else is a path, relative to the directory the command was run from.
    """
    if ckpt_path is None or str(ckpt_path) == "":
        return None
    output_dir = Path(output_dir)
    if str(ckpt_path) == "last":
        own = output_dir / "checkpoints" / LAST
        if own.is_file():
            return own.resolve()
        candidates = []
        if search_siblings and output_dir.parent.is_dir():
            candidates = [p for p in output_dir.parent.glob(f"*/checkpoints/{LAST}")
                          if p.is_file() and p.parent.parent.resolve() != output_dir.resolve()]
        if candidates:
            newest = max(candidates, key=lambda p: p.stat().st_mtime)
            log.info("ckpt_path=last: %s has no checkpoint; resuming the newest run beside it, %s", output_dir, newest)
            return newest.resolve()
        raise CheckpointError(f"ckpt_path=last: there is no checkpoint {own}"
                              + (f" nor any {LAST} in the other runs under {output_dir.parent}" if search_siblings else "")
                              + "; to resume a killed run pass hydra.run.dir=<its run directory> ckpt_path=last, or "
                              "ckpt_path=<path to a .ckpt file>; to start a new run drop ckpt_path")
    path = Path(os.path.expanduser(str(ckpt_path)))
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={ckpt_path}: no such checkpoint file"
                              + (f" ({path.resolve()})" if not path.is_absolute() else "")
                              + "; pass <run dir>/checkpoints/last.ckpt or ckpt_path=last")
    return path.resolve()


def version_compatible(saved: str, current: str = latentlab.__version__) -> bool:
    """Checkpoints are compatible within a minor release: same major and minor version."""
    def key(v: str) -> tuple[str, ...]:
        return tuple(str(v).split(".")[:2])
    return key(saved) == key(current)


def load_checkpoint_safely(path: str | Path, weights_only: bool = True) -> dict[str, Any]:
    """Load a latentlab checkpoint on the CPU and check its metadata; every failure is a `CheckpointError`
    that says what is wrong (missing, truncated/corrupted, code inside, not latentlab's, another version)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; pass <run dir>/checkpoints/last.ckpt")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its directory sits at the very end
        raise CheckpointError(f"cannot read checkpoint {path}: it is not a complete PyTorch checkpoint file (truncated "
                              "or corrupted, e.g. a copy that did not finish, or another kind of file); use an intact "
                              "copy, or the run's previous checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # noqa: BLE001 - a damaged archive member, or (weights_only) pickled objects other than tensors
        code = weights_only and "weights_only" in str(exc).lower()
        hint = (" It holds objects other than tensors and plain containers; if you wrote it yourself and trust it, "
                "load it with ckpt_weights_only=false (this runs code stored in the file)." if code else
                " The file is truncated or corrupted.")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {first}{hint}") from None
    meta = ckpt.get("latentlab") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or not meta.get("method"):
        raise CheckpointError(f"{path} is not a latentlab checkpoint (no 'latentlab' metadata naming its method); "
                              "it was not written by latentlab-train")
    version = str(meta.get("version", "unknown"))
    if not version_compatible(version):
        raise CheckpointError(f"{path} was written by latentlab {version}, but this is latentlab {latentlab.__version__} "
                              f"(checkpoints are compatible within a minor version); use latentlab=={version} for it, "
                              "or retrain")
    return ckpt


def check_checkpoint_method(ckpt: Mapping[str, Any], path: str | Path, method: str) -> None:
    """A checkpoint of one method cannot be resumed or evaluated as another."""
    saved = ckpt["latentlab"]["method"]
    if saved != method:
        raise CheckpointError(f"{path} is a checkpoint of method {saved!r}, but the config builds {method!r}; "
                              f"pass model={saved} to resume it (or evaluate it with latentlab-eval, which reads "
                              "the method from the checkpoint)")


def check_state_dict_matches(ckpt: Mapping[str, Any], path: str | Path, model: torch.nn.Module) -> None:
    """Same parameter names and shapes as the model the config builds, with the difference named."""
    saved = ckpt.get("state_dict")
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{path} has no model weights (state_dict); it is not a training checkpoint")
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    reshaped = [f"{k} {tuple(saved[k].shape)} vs {tuple(own[k].shape)}" for k in own
                if k in saved and isinstance(saved[k], torch.Tensor) and saved[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        parts = [f"{name}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                 for name, items in (("missing", missing), ("unexpected", unexpected), ("shape (checkpoint vs config)", reshaped))
                 if items]
        raise CheckpointError(f"{path} does not fit the model this config builds ({'; '.join(parts)}); resume with the "
                              "model/net/data settings the checkpoint was trained with (see its run's .hydra/config.yaml)")


def check_resume_checkpoint(path: str | Path, model: Any, weights_only: bool = True) -> dict[str, Any]:
    """Everything that can be wrong with a checkpoint to resume, found before the trainer touches it."""
    ckpt = load_checkpoint_safely(path, weights_only=weights_only)
    check_checkpoint_method(ckpt, path, getattr(model, "method", "?"))
    check_state_dict_matches(ckpt, path, model)
    if bad := nonfinite_entries(ckpt):
        raise CheckpointError(f"{path} holds non-finite values ({', '.join(bad[:3])}); resume from an earlier checkpoint")
    return ckpt


def describe_checkpoint(path: Path) -> str:
    """'<path> (epoch E, step S)' for messages; mmap keeps the tensors on disk."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return f"{path} (epoch {ckpt.get('epoch')}, step {ckpt.get('global_step')})"
    except Exception:  # noqa: BLE001 - a description, never a failure of its own
        return str(path)



def keep_csv_history(loggers: list[Any], resumed_step: int) -> None:
    """On resume into the same run directory, keep the CSV log rows written up to the checkpoint.

    Lightning's CSVLogger deletes an existing `metrics.csv` when it starts; rows logged after the
    checkpoint belong to steps that will run again and are dropped, the others are written back at
    once (so a second kill loses nothing either). Call before anything logs.
    """
    from lightning.pytorch.loggers import CSVLogger

    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        with path.open(newline="") as fh:
            rows = [{k: float(v) for k, v in row.items() if k and v not in ("", None)} for row in csv.DictReader(fh)]
        kept = [r for r in rows if r.get("step", 0) <= resumed_step]
        writer = logger.experiment  # creating the writer deletes the old file
        for row in kept:
            step = int(row.pop("step", 0))
            if "epoch" in row:
                row["epoch"] = int(row["epoch"])
            writer.log_metrics(row, step)
        writer.save()
        log.info("kept %d of %d rows of %s logged before the checkpoint", len(kept), len(rows), path)
