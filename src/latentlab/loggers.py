"""W&B runs that match Hydra jobs: one run per job, grouped by sweep, named by what sets the job apart.

Lightning's `WandbLogger` reuses `wandb.run` when one is in progress, so the jobs of a multirun (the
basic launcher runs them in one process) and repeated `latentlab.api.train` calls in a notebook all
land in the first job's run. `wandb_logger` (the `_target_` of conf/logger/wandb.yaml) finishes any run
still open, then names the new one from the run directory's `.hydra/overrides.yaml` and, in a sweep,
`<sweep dir>/multirun.yaml`: group = the sweep directory's name, name = the method plus the overrides
this job does not share with the sweep (`almond seed=2`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from latentlab.compare import NOT_IN_NAMES  # overrides that say where/how a run logs, not what it computes

_MAX_NAME = 120


def finish_wandb_run() -> None:
    """Finish the W&B run in progress in this process, if any (a no-op when wandb was never imported)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _load_list(path: Path) -> list[str]:
    try:
        return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []
    except Exception:  # a half-written or foreign file names nothing; the run still logs
        return []


def sweep_dir_of(run_dir: Path) -> Path | None:
    """The multirun directory a job's run directory belongs to: Hydra's, else a parent with `multirun.yaml`."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir)
    for parent in run_dir.parents:
        if (parent / "multirun.yaml").is_file():
            return parent
    return None


def sweep_overrides(sweep_dir: Path) -> list[str]:
    """The overrides the sweep was launched with (`model=vae,almond` as written), from `multirun.yaml`."""
    try:
        node = OmegaConf.select(OmegaConf.load(sweep_dir / "multirun.yaml"), "hydra.overrides.task", default=None)
    except Exception:
        return []
    return [str(o) for o in node] if node is not None else []


def method_label(overrides: list[str], model_target: str | None) -> tuple[str, list[str]]:
    """(the method: the `model=` choice, else the model class in lower case; the other overrides)."""
    choice = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == "model"), None)
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "model"]
    if choice is None and model_target:
        choice = str(model_target).rsplit(".", 1)[-1].lower()
    return choice or "", rest


def run_identity(run_dir: str | Path, model_target: str | None = None, task: str | None = None) -> tuple[str, str | None]:
    """(W&B run name, group) of the job whose run directory is `run_dir`; group None outside a sweep."""
    run_dir = Path(run_dir)
    own = _load_list(run_dir / ".hydra" / "overrides.yaml")
    sweep = sweep_dir_of(run_dir)
    shared = set(sweep_overrides(sweep)) if sweep is not None else set()
    differing = [o for o in own if o not in shared and o.split("=", 1)[0].lstrip("+~").split(".")[0] not in NOT_IN_NAMES]
    method, rest = method_label(differing, model_target)
    if not method:  # the method is shared by the sweep: still name it
        method = method_label(own, model_target)[0]
    name = " ".join(filter(None, [method or task or run_dir.name, *rest]))
    return name[:_MAX_NAME], (sweep.name if sweep is not None else None)


def wandb_logger(save_dir: str, project: str = "latentlab", name: str | None = None, group: str | None = None,
                 model_target: str | None = None, task: str | None = None, offline: bool = True,
                 log_model: bool | str = False, tags: list[str] | None = None, job_type: str | None = None,
                 **kwargs: Any) -> Any:
    """A Lightning `WandbLogger` for a run of its own: the run left open by an earlier job is finished
    first; `name`/`group` None: from the run directory (see the module doc)."""
    from lightning.pytorch.loggers import WandbLogger

    finish_wandb_run()
    auto_name, auto_group = run_identity(save_dir, model_target, task)
    return WandbLogger(save_dir=save_dir, project=project, name=name or auto_name, group=group or auto_group,
                       offline=offline, log_model=log_model, tags=list(tags or []), job_type=job_type or None, **kwargs)
