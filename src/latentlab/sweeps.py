"""Sweep summaries: one table of every job's final metrics, written into the sweep directory.

    latentlab-train -m model=vae,avb_ac,almond seed=1,2,3
    latentlab-train hparams_search=vae_optuna           # Optuna (hydra-optuna-sweeper), MULTIRUN by itself
    latentlab-train -m hydra/launcher=submitit_slurm ... # the same sweep as Slurm jobs

`SweepSummary` (wired in conf/hydra/callbacks/sweep_summary.yaml) writes `sweep_summary.json` and
`sweep_summary.md` after every job and again when the multirun ends. It reads the job directories
(`.hydra/overrides.yaml`, `metrics.json`) rather than the launcher's return values, so it is the same
for the basic launcher, Optuna and submitit (whose jobs run in other processes or on other machines),
and a sweep that stops half-way still leaves a summary of the jobs that finished; a job without
`metrics.json` is listed as failed. The best job is picked by `optimized_metric` (what the train
function returns to Optuna) in the sweeper's direction, per dataset: jobs on different data are never ranked
together (`best` is set only when the sweep has one dataset; `best_by_data` always).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from latentlab.builders import write_json_atomic
from latentlab.compare import (
    HIGHER_IS_BETTER,
    comparison_table,
    data_of,
    default_columns,
    natural_key,
    split_overrides,
)

__all__ = ["SweepSummary", "job_dirs", "split_overrides", "summarize_sweep", "summary_markdown", "write_sweep_summary"]

log = logging.getLogger("latentlab")

SUMMARY_NAME = "sweep_summary"
_SKIP_PARTS = {".submitit"}  # submitit keeps pickled jobs and logs there, not runs


def job_dirs(sweep_dir: str | Path) -> list[Path]:
    """Job directories of a sweep (each holds `.hydra/overrides.yaml`), in job order (10 after 9)."""
    root = Path(sweep_dir)
    found = [p.parent.parent for p in root.rglob(".hydra/overrides.yaml")
             if p.parent.parent != root and not _SKIP_PARTS & set(p.parent.parent.relative_to(root).parts)]
    return sorted(found, key=lambda d: natural_key(d.relative_to(root)))


def infer_direction(metric: str | None) -> str:
    """`maximize` for metrics where higher is better (elbo, is_mean, ...), else `minimize` (nll, gaps, fid)."""
    return "maximize" if metric and metric.split("/")[-1] in HIGHER_IS_BETTER else "minimize"


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def summarize_sweep(sweep_dir: str | Path, metric: str | None = None, direction: str | None = None) -> dict[str, Any]:
    """{sweep_dir, metric, direction, jobs: [...], best: job | None, n_completed, n_failed} from the job dirs.

    Each job: `job` (its directory relative to the sweep), `overrides`, `status` (completed: it wrote
    metrics.json; failed: it did not), `metrics` and `value` (the metric, None if absent or not finite).
    """
    root = Path(sweep_dir)
    direction = direction or infer_direction(metric)
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be minimize or maximize, got {direction!r}")
    jobs: list[dict[str, Any]] = []
    for d in job_dirs(root):
        overrides = [str(o) for o in OmegaConf.load(d / ".hydra" / "overrides.yaml")]
        metrics_file = d / "metrics.json"
        try:
            metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
        except ValueError:  # half-written by a job that died mid-write (train writes atomically, others may not)
            metrics = None
        jobs.append({"job": str(d.relative_to(root)), "dir": str(d), "overrides": overrides, "data": data_of(d) or "?",
                     "status": "completed" if metrics is not None else "failed", "metrics": metrics or {},
                     "value": _finite((metrics or {}).get(metric)) if metric else None})
    # the best job of each dataset: numbers on different data are never ranked against each other
    by_data: dict[str, list[dict[str, Any]]] = {}
    for j in jobs:
        if j["value"] is not None:
            by_data.setdefault(j["data"], []).append(j)
    pick = min if direction == "minimize" else max
    best_by_data = {data: pick(js, key=lambda j: j["value"]) for data, js in by_data.items()}
    summary: dict[str, Any] = {
        "sweep_dir": str(root), "metric": metric, "direction": direction, "jobs": jobs,
        "best": next(iter(best_by_data.values())) if len(best_by_data) == 1 else None, "best_by_data": best_by_data,
        "n_completed": sum(j["status"] == "completed" for j in jobs),
        "n_failed": sum(j["status"] == "failed" for j in jobs),
    }
    optuna = root / "optimization_results.yaml"
    if optuna.is_file():
        summary["optuna"] = OmegaConf.to_container(OmegaConf.load(optuna), resolve=True)
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as markdown: a header naming the best job, then one row per job (`latentlab.compare`'s table)."""
    metric, best_by_data = summary["metric"], summary.get("best_by_data") or {}
    lines = [f"# Sweep {summary['sweep_dir']}", "",
             f"{len(summary['jobs'])} jobs: {summary['n_completed']} completed, {summary['n_failed']} failed."]
    if metric:
        lines.append(f"Optimised metric: `{metric}` ({summary['direction']}).")
    if len(best_by_data) == 1:
        best = next(iter(best_by_data.values()))
        lines.append(f"Best: job {best['job']}, {metric} = {best['value']:.4f}.")
    elif best_by_data:
        lines.append("Best per dataset (jobs on different data are not ranked together): " + "; ".join(
            f"{data}: job {b['job']}, {metric} = {b['value']:.4f}" for data, b in best_by_data.items()) + ".")
    if "optuna" in summary:
        lines.append(f"Optuna's best parameters: `{summary['optuna'].get('best_params')}`.")
    # rows are named by what differs between jobs; what all jobs share is said once
    shared, varying = split_overrides([j["overrides"] for j in summary["jobs"]])
    if shared:
        lines.append(f"Every job: `{' '.join(shared)}`.")
    rows = {f"{j['job']}: {' '.join(own)}" + (" (failed)" if j["status"] == "failed" else ""): j["metrics"]
            for j, own in zip(summary["jobs"], varying)}
    columns = [c for c in default_columns(rows) if c.startswith(("val/", "test/"))]
    if metric:
        columns = [metric] + [c for c in columns if c != metric]
    data = {name: j.get("data", "?") for name, j in zip(rows, summary["jobs"])}
    return "\n".join(lines) + "\n\n" + (comparison_table(rows, columns, data) if rows else "no jobs yet\n")


def write_sweep_summary(sweep_dir: str | Path, metric: str | None = None,
                        direction: str | None = None) -> tuple[Path, Path]:
    """Write `sweep_summary.json` and `.md` into the sweep directory (atomically: jobs may finish together)."""
    root = Path(sweep_dir)
    summary = summarize_sweep(root, metric, direction)
    js, md = root / f"{SUMMARY_NAME}.json", root / f"{SUMMARY_NAME}.md"
    write_json_atomic(js, summary)
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text(summary_markdown(summary))
    tmp.replace(md)
    return js, md


def _sweeper_direction(config: DictConfig) -> str | None:
    direction = OmegaConf.select(config, "hydra.sweeper.direction", default=None)
    direction = getattr(direction, "name", direction)  # Optuna's schema gives an Enum
    if isinstance(direction, str):
        return direction
    return None  # the basic sweeper has none; multi-objective Optuna gives a list: infer from the metric


class SweepSummary(Callback):
    """Hydra callback: `sweep_summary.json`/`.md` in the sweep directory after each job and at the end.

    `metric`/`direction`: what picks the best job; by default the config's `optimized_metric` and
    the sweeper's `direction` (Optuna), else inferred from the metric's name. Single runs are untouched.
    """

    def __init__(self, metric: str | None = None, direction: str | None = None) -> None:
        self.metric, self.direction = metric, direction

    def _write(self, config: DictConfig) -> None:
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        if not sweep_dir.is_dir():
            return
        metric = self.metric or OmegaConf.select(config, "optimized_metric", default=None)
        direction = self.direction or _sweeper_direction(config)
        try:
            js, _ = write_sweep_summary(sweep_dir, metric, direction)
        except OSError as exc:  # a summary must never fail the sweep it describes
            log.warning("could not write the sweep summary in %s: %s", sweep_dir, exc)
            return
        log.debug("sweep summary: %s", js)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if OmegaConf.select(config, "hydra.mode", default=None) == RunMode.MULTIRUN:
            self._write(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._write(config)
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        if (sweep_dir / f"{SUMMARY_NAME}.md").is_file():
            log.info("sweep summary: %s", sweep_dir / f"{SUMMARY_NAME}.md")

