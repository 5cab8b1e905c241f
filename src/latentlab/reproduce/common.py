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


def _train_one(run_dir: Path, overrides: list[str], threads: int) -> None:
    """One run in a worker process on `threads` torch threads (ALMOND's block workers follow that count)."""
    import torch

    torch.set_num_threads(threads)
    train_run(run_dir, overrides)


def train_runs(jobs: Sequence[tuple[Path, list[str]]], workers: int | None = None,
               threads: Sequence[int] | None = None) -> None:
    """Train independent runs, `workers` at a time in separate processes (default: one per CPU core, at most one per
    run), in the order given (put the longest first); `threads[i]` torch threads for job i (default 1: the workers
    share the cores). One worker trains in this process. Each run is seeded by its own overrides, so the results
    are the sequential ones."""
    import os

    threads = list(threads) if threads is not None else [1] * len(jobs)
    todo = [(Path(d), list(o), t) for (d, o), t in zip(jobs, threads, strict=True) if not (Path(d) / "metrics.json").exists()]
    workers = min(len(todo), workers or os.cpu_count() or 1)
    if workers <= 1:
        for run_dir, overrides, _ in todo:
            train_run(run_dir, overrides)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in [pool.submit(_train_one, *job) for job in todo]:
            future.result()  # re-raises a worker's error here


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
