"""`latentlab-eval ckpt_path=PATH`: rebuild any method's model from the config saved in its checkpoint,
evaluate it on the test split with the shared evaluator, and write `metrics.json` + `metrics.md`.

Checkpoints are read with `torch.load(weights_only=True)`: no code from a checkpoint is executed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from latentlab.builders import build_datamodule, build_loggers, build_model, resolve_paths, scalar_metrics, write_json_atomic
from latentlab.errors import CheckpointError, LatentlabError

log = logging.getLogger("latentlab")
EVAL_SPEC_KEYS = ("nll", "k", "chunk_size", "ais_steps", "ais_chains", "ais_leapfrog", "max_batches")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a latentlab checkpoint safely, with errors that say what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; pass ckpt_path=<run dir>/checkpoints/last.ckpt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a checkpoint, pickled code
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.__class__.__name__}: {exc}. "
                              "The file is corrupted, truncated, or not a latentlab checkpoint.") from exc
    meta = ckpt.get("latentlab") if isinstance(ckpt, dict) else None
    if not meta or not meta.get("config"):
        raise CheckpointError(f"{path} is not a latentlab checkpoint (no 'latentlab' metadata with the run config); "
                              "it was not written by latentlab-train")
    return ckpt


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    """{run: {metric: value}} -> a markdown table, metrics as columns."""
    keys = sorted({k for r in rows.values() for k in r})
    lines = ["| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.4f}" if k in r else "" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def evaluate(cfg: DictConfig) -> dict[str, float]:
    resolve_paths(cfg)
    ckpt = load_checkpoint(cfg.ckpt_path)
    run_cfg = OmegaConf.create(ckpt["latentlab"]["config"])
    with open_dict(run_cfg):
        run_cfg.paths.data_dir = cfg.paths.data_dir  # the data live where the evaluator runs
        if cfg.get("data_overrides"):
            run_cfg.data = OmegaConf.merge(run_cfg.data, cfg.data_overrides)
        overrides = {("estimator" if k == "nll" else k): v for k, v in (cfg.get("eval") or {}).items()
                     if v is not None and k in EVAL_SPEC_KEYS}
        run_cfg.model.eval = OmegaConf.merge(run_cfg.model.get("eval") or {}, overrides)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    datamodule = build_datamodule(run_cfg)
    datamodule.prepare_data()
    datamodule.setup("test")
    model = build_model(run_cfg, datamodule)
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {cfg.ckpt_path} does not match method {ckpt['latentlab']['method']!r} "
                              f"as this latentlab builds it (missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}); "
                              "was it written by another version?")
    if hasattr(model, "on_load_checkpoint"):
        model.on_load_checkpoint(ckpt)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=build_loggers(cfg) or False, callbacks=[])
    trainer.test(model, datamodule=datamodule)
    metrics = scalar_metrics(trainer.callback_metrics)
    metrics["method"] = ckpt["latentlab"]["method"]  # type: ignore[assignment]
    out = Path(cfg.paths.output_dir)
    write_json_atomic(out / "metrics.json", metrics)
    numeric = {k: v for k, v in metrics.items() if isinstance(v, float)}
    (out / "metrics.md").write_text(markdown_table({f"{metrics['method']} ({cfg.ckpt_path})": numeric}))
    log.info("metrics: %s", numeric)
    return numeric


@hydra.main(version_base="1.3", config_path="pkg://latentlab.conf", config_name="eval")
def _hydra_main(cfg: DictConfig) -> Any:
    try:
        return evaluate(cfg).get("test/nll")
    except LatentlabError as exc:
        print(f"latentlab: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
