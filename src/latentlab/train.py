"""`latentlab-train`: compose the Hydra config, fit, test, and write `metrics.json` in the run directory.

    latentlab-train                                   # VAE on the embedded digits, ~1 minute on a CPU
    latentlab-train model=avb data=mnist trainer.max_epochs=5
    latentlab-train -m model.latent_dim=2,8,32       # one run directory per job
    latentlab-train hydra.run.dir=<run dir> ckpt_path=last   # resume a killed/preempted run where it stopped
    latentlab-train ckpt_path=last model=almond       # resume the newest ALMOND run of this task

Reliability contract (see `latentlab.checkpointing`, `latentlab.callbacks.faults`, `latentlab.config_schema`):
every config value and command-line override is checked before anything is built; data files are
checked before training; `checkpoints/last.ckpt` is written atomically (every epoch by default,
`callbacks.model_checkpoint.every_n_train_steps` for steps too) with the random states, so a run
killed at any point resumes with `ckpt_path=last` and, from any checkpoint, ends with the same
metrics as if never killed; a NaN/inf stops the run with the step, the component and the last good
checkpoint, which is never overwritten by a non-finite model. SIGTERM (a preemption) writes
`last.ckpt` at the current step, data order and random streams included, and exits with status 143
(`latentlab.entry.EXIT_PREEMPTED`); resuming then reproduces the uninterrupted run exactly. Resuming from
a run directory rebuilds that run's own config (`latentlab.resume`). Errors go through `latentlab.entry`:
one line `latentlab: error: ...`, exit status 2, no run directory for a refused command, a `FAILED`
file in the directory of a run that failed after it started.

Resuming loads checkpoints with `torch.load(weights_only=True)`; `ckpt_weights_only=false` is the
explicit opt-in to a full unpickle (it runs code stored in the file: only for checkpoints you trust).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig

from latentlab import entry
from latentlab.errors import ConfigError, NumericalError, Preempted

if TYPE_CHECKING:
    import lightning.pytorch as L

log = logging.getLogger("latentlab")


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training job from a composed config; returns the final flat metrics.

    Everything that can be checked is checked before `fit` starts: every config value (schema), the
    checkpoint to resume, the data files (setup), the model arguments (constructors). A failure there
    writes no checkpoint and no metrics.
    """
    # Lightning and the models are imported here, not at module level, so that a malformed command
    # line is refused before the seconds it takes to import them.
    import lightning.pytorch as L

    from latentlab.builders import (
        build_callbacks,
        build_datamodule,
        build_loggers,
        build_model,
        build_trainer,
        resolve_paths,
        scalar_metrics,
        write_json_atomic,
    )
    from latentlab.checkpointing import check_resume_checkpoint, keep_csv_history
    from latentlab.config_schema import check_model_against_trainer, validate_config

    validate_config(cfg)
    resolve_paths(cfg)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = _checkpoint_to_resume(cfg, output_dir)
    weights_only = bool(cfg.get("ckpt_weights_only", True))
    if not weights_only and ckpt_path is not None:
        log.warning("ckpt_weights_only=false: unpickling %s in full; this runs any code stored in it", ckpt_path)
    if cfg.get("seed") is not None:  # said below, once the config has built: a refused one prints its error alone
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")  # verify files and sizes now, not mid-run
    model = build_model(cfg, datamodule)
    check_model_against_trainer(cfg, model)
    resumed = check_resume_checkpoint(ckpt_path, model, weights_only=weights_only) if ckpt_path is not None else None
    callbacks = build_callbacks(cfg)
    loggers = build_loggers(cfg)
    trainer = build_trainer(cfg, _without_default_summary(cfg, callbacks), loggers)
    if cfg.get("seed") is not None:
        log.info("Seed set to %d", int(cfg.seed))
    if resumed is not None:
        log.info("resuming from %s (epoch %s, step %s)", ckpt_path, resumed.get("epoch"), resumed.get("global_step"))
        keep_csv_history(loggers, int(resumed.get("global_step", 0)))
        del resumed
    for logger in loggers:
        logger.log_hyperparams(model.run_config or {})

    metrics: dict[str, float] = {}
    entry.mark_started()
    (output_dir / entry.PREEMPTED).unlink(missing_ok=True)  # it is being resumed now
    if cfg.get("train", True):
        _guarded(trainer, model, output_dir, lambda: trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path,
                                                                 weights_only=weights_only))
        metrics.update(scalar_metrics(trainer.callback_metrics))
        for callback in trainer.checkpoint_callbacks:  # what was logged before the resume and not since
            metrics = {**getattr(callback, "resumed_metrics", {}), **metrics}
    if cfg.get("test", True):
        # without training, test the checkpoint given (not the freshly initialised model)
        test_ckpt = ckpt_path if not cfg.get("train", True) else None
        trainer.test(model, datamodule=datamodule, ckpt_path=test_ckpt, weights_only=weights_only)
        metrics.update(scalar_metrics(trainer.callback_metrics))
        metrics.update(model.evaluation_record("test"))  # how test/nll was obtained (estimator, budget, settings)
    if trainer.is_global_zero:
        write_json_atomic(output_dir / "metrics.json", metrics)
        log.info("metrics: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in sorted(metrics.items())})
    return metrics


def _checkpoint_to_resume(cfg: DictConfig, output_dir: Path) -> Path | None:
    """`ckpt_path` as a file; for a preempted run requeued with its original command (Slurm, submitit:
    no `ckpt_path`), its own last.ckpt. The search for "the newest run of this task and method" behind
    a bare `ckpt_path=last` happened before Hydra (`latentlab.resume`)."""
    from latentlab.checkpointing import LAST, resolve_ckpt_path

    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir, search_siblings=False)
    requeued = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    if ckpt_path is None and ((output_dir / entry.PREEMPTED).is_file() or requeued) \
            and (output_dir / "checkpoints" / LAST).is_file():
        ckpt_path = resolve_ckpt_path("last", output_dir, search_siblings=False)
        log.info("%s was preempted: resuming it from %s", output_dir, ckpt_path)
    return ckpt_path


def _without_default_summary(cfg: DictConfig, callbacks: list[Any]) -> list[Any]:
    """With latentlab's own model summary among the callbacks, Lightning must not add its default one
    (it says "Trainer already configured with model summary callbacks" otherwise)."""
    from lightning.pytorch.callbacks import ModelSummary
    from omegaconf import open_dict

    if any(isinstance(c, ModelSummary) for c in callbacks) and cfg.trainer.get("enable_model_summary", True):
        with open_dict(cfg):
            cfg.trainer.enable_model_summary = False
    return callbacks


def _guarded(trainer: L.Trainer, model: Any, output_dir: Path, fit: Any) -> None:
    """Run `fit`; a numerical failure is re-raised naming the last good checkpoint, which is kept; a
    SIGTERM (Lightning's `SIGTERMException`, after the preemption checkpoint) becomes `Preempted`."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from latentlab.callbacks.faults import NumericalGuard, explain_numerical_error
    from latentlab.checkpointing import LAST, describe_checkpoint

    try:
        fit()
    except SIGTERMException:
        last = output_dir / "checkpoints" / LAST
        raise Preempted(f"stopped by SIGTERM at training step {trainer.global_step}; checkpoint "
                        f"{describe_checkpoint(last) if last.is_file() else '(none written)'}; resume with "
                        f"latentlab-train hydra.run.dir={output_dir} ckpt_path=last") from None
    except NumericalError as exc:
        paths = [Path(p) for cb in trainer.checkpoint_callbacks for p in (getattr(cb, "last_path", None),
                                                                            getattr(cb, "last_model_path", None)) if p]
        paths.append(output_dir / "checkpoints" / LAST)
        last = next((p for p in paths if p.is_file()), None)
        guard = next((cb for cb in trainer.callbacks if isinstance(cb, NumericalGuard)), None)
        raise NumericalError(explain_numerical_error(exc, model, describe_checkpoint(last) if last else None, guard)) from None


def preflight(argv: Sequence[str]) -> list[str] | None:
    """Refuse a malformed command line before Hydra runs: override syntax (Hydra's grammar), then, for
    a single run, composition (unknown config group options such as `model=nosuchmodel`, keys not in
    the config). Hydra's own report of these is a generic message with exit status 1.

    Returns the overrides a single run launches with: a resume from a run directory rebuilds that run's
    overrides and records itself in `.hydra/resume-N` (`latentlab.resume.plan_relaunch`); None keeps argv.
    """
    from hydra._internal.utils import get_args_parser

    from latentlab.config_schema import check_overrides
    from latentlab.resume import plan_relaunch

    args, _ = get_args_parser().parse_known_args(list(argv))
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion or args.experimental_rerun:
        return None  # Hydra's own informational modes
    check_overrides(args.overrides)
    if args.multirun or args.config_path or args.config_dir or args.config_name:
        return None  # sweep values or another config tree: Hydra composes per job
    if "hydra.output_subdir=null" in args.overrides:
        return None  # a DDP rank Lightning relaunched with rank 0's (already planned) command line
    overrides = plan_relaunch(args.overrides, lambda o: _compose(o, hydra_node=True), entry.say)
    _compose(overrides)
    return overrides


def _compose(overrides: Sequence[str], hydra_node: bool = False) -> DictConfig:
    """The train config these overrides give; not builders.compose_config: that module imports Lightning,
    which this check runs before."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_module(config_module="latentlab.conf", version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra_node)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"the command line does not give a valid config: {str(exc).strip()}") from None


@hydra.main(version_base="1.3", config_path="pkg://latentlab.conf", config_name="train")
@entry.job
def _hydra_main(cfg: DictConfig) -> Any:
    metrics = train(cfg)
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


def main(argv: Sequence[str] | None = None) -> None:
    entry.run(_hydra_main, preflight=preflight, argv=argv)


if __name__ == "__main__":
    main()
