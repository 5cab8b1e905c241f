"""`latentlab-train`: compose the Hydra config, fit, test, and write `metrics.json` in the run directory.

    latentlab-train                                   # VAE on the embedded digits, ~1 minute on a CPU
    latentlab-train model=avb_ac data=mnist trainer.max_epochs=5
    latentlab-train -m model.latent_dim=2,8,32       # one run directory per job
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as L
from omegaconf import DictConfig

from latentlab.builders import (
    build_callbacks,
    build_datamodule,
    build_loggers,
    build_model,
    resolve_paths,
    scalar_metrics,
    write_json_atomic,
)
from latentlab.errors import LatentlabError

log = logging.getLogger("latentlab")


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training job from a composed config; returns the final flat metrics.

    Everything that can be checked is checked before `fit` starts: the data files (setup), the model
    arguments (constructors), the trainer arguments. A failure there writes no checkpoint and no metrics.
    """
    resolve_paths(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")  # verify files and sizes now, not mid-run
    model = build_model(cfg, datamodule)
    callbacks = build_callbacks(cfg)
    loggers = build_loggers(cfg)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(model.run_config or {})

    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics.update(scalar_metrics(trainer.callback_metrics))
    if cfg.get("test", True):
        trainer.test(model, datamodule=datamodule)
        metrics.update(scalar_metrics(trainer.callback_metrics))
    if trainer.is_global_zero:
        write_json_atomic(Path(cfg.paths.output_dir) / "metrics.json", metrics)
        log.info("metrics: %s", {k: round(v, 4) for k, v in sorted(metrics.items())})
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://latentlab.conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> Any:
    try:
        metrics = train(cfg)
    except LatentlabError as exc:
        print(f"latentlab: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
