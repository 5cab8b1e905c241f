"""`latentlab-train`: compose the Hydra config, fit, test, and write `metrics.json` in the run directory.

    latentlab-train                                   # VAE on the embedded digits, ~1 minute on a CPU
    latentlab-train model=avb data=mnist trainer.max_epochs=5
    latentlab-train -m model.latent_dim=2,8,32       # one run directory per job
    latentlab-train hydra.run.dir=<run dir> ckpt_path=last   # resume a killed run where it stopped

Reliability contract (see `latentlab.checkpointing`, `latentlab.callbacks.faults`, `latentlab.config_schema`):
every config value and command-line override is checked before anything is built; data files are
checked before training; `checkpoints/last.ckpt` is written atomically (every epoch by default,
`callbacks.model_checkpoint.every_n_train_steps` for steps too) with the random states, so a run
killed at any point resumes with `ckpt_path=last` and, from an epoch boundary, ends with the same
metrics as if never killed; a NaN/inf stops the run with the step, the component and the last good
checkpoint, which is never overwritten by a non-finite model. User errors print one line,
`latentlab: error: ...`, and exit with status 2; nothing that looks like a finished run is written.

Resuming loads checkpoints with `torch.load(weights_only=True)`; `ckpt_weights_only=false` is the
explicit opt-in to a full unpickle (it runs code stored in the file: only for checkpoints you trust).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import hydra
from omegaconf import DictConfig

from latentlab.errors import ConfigError, LatentlabError, NumericalError

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
    from latentlab.checkpointing import check_resume_checkpoint, keep_csv_history, resolve_ckpt_path
    from latentlab.config_schema import check_model_against_trainer, validate_config

    validate_config(cfg)
    resolve_paths(cfg)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir, search_siblings=_fresh_run_dir())
    weights_only = bool(cfg.get("ckpt_weights_only", True))
    if not weights_only and ckpt_path is not None:
        log.warning("ckpt_weights_only=false: unpickling %s in full; this runs any code stored in it", ckpt_path)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")  # verify files and sizes now, not mid-run
    model = build_model(cfg, datamodule)
    check_model_against_trainer(cfg, model)
    resumed = check_resume_checkpoint(ckpt_path, model, weights_only=weights_only) if ckpt_path is not None else None
    callbacks = build_callbacks(cfg)
    loggers = build_loggers(cfg)
    trainer = build_trainer(cfg, callbacks, loggers)
    if resumed is not None:
        log.info("resuming from %s (epoch %s, step %s)", ckpt_path, resumed.get("epoch"), resumed.get("global_step"))
        keep_csv_history(loggers, int(resumed.get("global_step", 0)))
        del resumed
    for logger in loggers:
        logger.log_hyperparams(model.run_config or {})

    metrics: dict[str, float] = {}
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
    if trainer.is_global_zero:
        write_json_atomic(output_dir / "metrics.json", metrics)
        log.info("metrics: %s", {k: round(v, 4) for k, v in sorted(metrics.items())})
    return metrics


def _guarded(trainer: L.Trainer, model: Any, output_dir: Path, fit: Any) -> None:
    """Run `fit`; a numerical failure is re-raised naming the last good checkpoint, which is kept."""
    from latentlab.callbacks.faults import NumericalGuard, explain_numerical_error
    from latentlab.checkpointing import LAST, describe_checkpoint

    try:
        fit()
    except NumericalError as exc:
        paths = [Path(p) for cb in trainer.checkpoint_callbacks for p in (getattr(cb, "last_path", None),
                                                                            getattr(cb, "last_model_path", None)) if p]
        paths.append(output_dir / "checkpoints" / LAST)
        last = next((p for p in paths if p.is_file()), None)
        guard = next((cb for cb in trainer.callbacks if isinstance(cb, NumericalGuard)), None)
        raise NumericalError(explain_numerical_error(exc, model, describe_checkpoint(last) if last else None, guard)) from None


def _hydra_config() -> Any | None:
    """Hydra's runtime config inside a Hydra job, None elsewhere (tests, notebooks via `latentlab.api`)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _fresh_run_dir() -> bool:
    """Whether `ckpt_path=last` may look beyond this run's directory for the task's newest run: only
    for a single run whose directory Hydra made up (a timestamp). A user who named the directory
    (`hydra.run.dir=...`) means that run, and a sweep job must never pick up a sibling job's checkpoint."""
    from hydra.types import RunMode

    hc = _hydra_config()
    return (hc is not None and hc.mode == RunMode.RUN
            and not any(o.split("=", 1)[0].lstrip("+~") == "hydra.run.dir" for o in hc.overrides.hydra))


def preflight(argv: Sequence[str]) -> None:
    """Refuse a malformed command line before Hydra runs: override syntax (Hydra's grammar), then, for
    a single run, composition (unknown config group options such as `model=nosuchmodel`, keys not in
    the config). Hydra's own report of these is a generic message with exit status 1."""
    from hydra._internal.utils import get_args_parser

    from latentlab.config_schema import check_overrides

    args, _ = get_args_parser().parse_known_args(list(argv))
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion or args.experimental_rerun:
        return  # Hydra's own informational modes
    check_overrides(args.overrides)
    if args.multirun or args.config_path or args.config_dir or args.config_name:
        return  # sweep values or another config tree: Hydra composes per job
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:  # not builders.compose_config: that module imports Lightning, which this check runs before
        with initialize_config_module(config_module="latentlab.conf", version_base="1.3"):
            compose(config_name="train", overrides=list(args.overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"the command line does not give a valid config: {str(exc).strip()}") from None


def _in_multirun() -> bool:
    from hydra.types import RunMode

    hc = _hydra_config()
    return hc is not None and hc.mode == RunMode.MULTIRUN


def report(exc: LatentlabError) -> NoReturn:
    """The one way a user error reaches the user: one message on stderr, exit status 2."""
    print(f"latentlab: error: {exc}", file=sys.stderr)
    raise SystemExit(2)


@hydra.main(version_base="1.3", config_path="pkg://latentlab.conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> Any:
    try:
        metrics = train(cfg)
    except LatentlabError as exc:
        if _in_multirun():  # one bad job must not end the sweep: Hydra marks it failed (Optuna: a failed trial)
            print(f"latentlab: error: {exc}", file=sys.stderr)
            raise RuntimeError(f"job failed: {exc}") from None
        report(exc)
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


def main(argv: Sequence[str] | None = None) -> None:
    try:
        preflight(sys.argv[1:] if argv is None else argv)
    except LatentlabError as exc:
        report(exc)
    _hydra_main()


if __name__ == "__main__":
    main()
