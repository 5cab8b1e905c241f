"""What the paper tables share: running one configured job, reading its metrics, formatting cells."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# quiet, cheap runs: the tables read metrics.json, not the dashboards
QUIET = ["logger=none", "callbacks.progress_bar=null", "callbacks.model_summary=null"]


def train_run(run_dir: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """One `latentlab-train <overrides>` job into `run_dir` (reused if it already finished); its metrics.json."""
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.exists():
        from latentlab import api

        api.train([*QUIET, *overrides], run_dir=run_dir)
    return json.loads(metrics_file.read_text())


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error over repeats (nan SE for one repeat)."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else float("nan")


def cell(values: Sequence[float], digits: int = 3) -> str:
    """`0.123` for one repeat, `0.123 ± 0.004` (mean ± SE) for several."""
    mean, se = mean_se(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if math.isnan(se) else f"{mean:.{digits}f} ± {se:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
