"""Reading checkpoints: `ckpt_path` -> a file, and every way a checkpoint to resume or evaluate can be
wrong, found before the trainer touches it, as one `CheckpointError` that says what to do.

Checkpoints are read with `torch.load(weights_only=True)` (tensors and plain containers only; no code in
a checkpoint runs) unless the caller opts in to a full unpickle.
"""

from __future__ import annotations

import csv
import logging
import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

import latentlab
from latentlab.errors import CheckpointError

log = logging.getLogger("latentlab")

LAST = "last.ckpt"


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


# Sections whose infinities are sentinels by design, not diverged training: ModelCheckpoint's `kth_value` and
# EarlyStopping's `best_score` start at inf under mode=min, ReduceLROnPlateau's `best` too.
SENTINEL_SECTIONS = frozenset({"callbacks", "lr_schedulers"})


def nonfinite_entries(checkpoint: Mapping[str, Any]) -> list[str]:
    """Key paths of floating tensors holding NaN or inf in the training state (weights, optimiser moments, chains;
    not `SENTINEL_SECTIONS`): one batched check, then a per-tensor look only on failure."""
    floats = [(k, t) for section, value in checkpoint.items() if section not in SENTINEL_SECTIONS
              for k, t in iter_tensors(value, str(section)) if t.is_floating_point() and t.numel()]
    if not floats:
        return []
    flags = torch.stack([torch.isfinite(t).all().cpu() for _, t in floats])
    if bool(flags.all()):
        return []
    return [k for (k, _), ok in zip(floats, flags.tolist()) if not ok]


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
    drop_old_eval_block(ckpt)
    return ckpt


def drop_old_eval_block(ckpt: dict[str, Any]) -> None:
    """Checkpoints written before conf/eval/nll/ carry a per-model `eval:` block (EvalSpec) in their config and
    hyper-parameters; no constructor takes it now, and the evaluator's `eval.nll` decides the budget."""
    config = ckpt["latentlab"].get("config")
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        config["model"].pop("eval", None)
    if isinstance(ckpt.get("hyper_parameters"), dict):
        ckpt["hyper_parameters"].pop("eval", None)


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
