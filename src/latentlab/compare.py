"""One table comparing several evaluated runs: the point of having one evaluator for every method.

    latentlab-eval -m ckpt_path=a.ckpt,b.ckpt ...   # writes <sweep dir>/comparison.md and .json at the end
    python -m latentlab.compare outputs/eval/multiruns/<stamp> other/run/metrics.json -o table_dir

Each run is a `metrics.json` (as `latentlab-eval` and `latentlab-train` write them): flat `stage/name`
keys, `name_se` holding a standard error, plus the strings `method` and `ckpt_path`. Values with a
standard error print as `mean ± se`; the best run per column (where "best" has a direction) is bold.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("latentlab")

#: Column order of the headline metrics; any other numeric key follows alphabetically.
HEADLINE = ("test/nll", "test/elbo", "test/inference_gap", "test/approximation_gap", "test/amortization_gap",
            "test/bdmc_lower", "test/bdmc_upper", "test/bdmc_gap", "test/fid", "test/kid_mean", "test/is_mean",
            "test/precision", "test/recall", "test/classifier_acc")
LOWER_IS_BETTER = {"nll", "fid", "kid_mean", "inference_gap", "approximation_gap", "amortization_gap"}
HIGHER_IS_BETTER = {"elbo", "is_mean", "precision", "recall"}
TEXT_KEYS = ("method", "ckpt_path")


def load_metrics(path: str | Path) -> dict[str, Any]:
    """A run's metrics: `path` is a metrics.json or a run directory holding one."""
    path = Path(path)
    file = path / "metrics.json" if path.is_dir() else path
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"cannot read run metrics {file}: {exc}") from exc


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """metrics.json files: each path is one, a run directory, or a sweep directory searched recursively
    (jobs in numeric order, so job 10 follows job 9)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif (p / "metrics.json").is_file():
            found.append(p / "metrics.json")
        elif p.is_dir():
            found.extend(sorted(p.rglob("metrics.json"), key=lambda f: _natural_key(f.relative_to(p))))
        else:
            raise FileNotFoundError(f"{p} is neither a metrics.json nor a directory with runs")
    return found


def _natural_key(path: Path) -> list[tuple[int, int, str]]:
    """Sort key under which job directory "10" follows "9"."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts]


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def default_columns(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Headline metrics present in any row, then the other numeric keys; `_se` keys fold into their metric."""
    keys = {k for r in rows.values() for k in _numeric(r)}
    values = {k for k in keys if not (k.endswith("_se") and k[:-3] in keys)}
    return [k for k in HEADLINE if k in values] + sorted(values - set(HEADLINE))


def _direction(key: str) -> int:
    name = key.split("/")[-1]
    return -1 if name in LOWER_IS_BETTER else 1 if name in HIGHER_IS_BETTER else 0


def format_value(value: float | None, se: float | None = None) -> str:
    if value is None:
        return ""
    if se is None or not math.isfinite(se):
        return f"{value:.4f}"
    return f"{value:.4f} ± {se:.4f}"


def comparison_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """{run name: metrics} -> a markdown table, one row per run, metrics as columns."""
    columns = list(columns) if columns is not None else default_columns(rows)
    numeric = {name: _numeric(r) for name, r in rows.items()}
    best: dict[str, float] = {}
    for key in columns:
        sign, present = _direction(key), [m[key] for m in numeric.values() if key in m and math.isfinite(m[key])]
        if sign and len(present) > 1:
            best[key] = max(present) if sign > 0 else min(present)
    text_cols = [c for c in TEXT_KEYS if any(c in r for r in rows.values())]
    header = ["run", *text_cols, *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in rows.items():
        cells = [name, *(_short(str(r.get(c, ""))) for c in text_cols)]
        for key in columns:
            m = numeric[name]
            cell = format_value(m.get(key), m.get(f"{key}_se"))
            cells.append(f"**{cell}**" if key in best and m.get(key) == best[key] else cell)
        lines.append("| " + " | ".join(cells) + " |")
    notes = "\nnats per example; `± x`: standard error over examples; bold: best run where the direction is clear " \
            "(nll, fid, kid, gaps: lower; elbo, is, precision, recall: higher). bdmc_lower <= log p(x) <= bdmc_upper " \
            "on data simulated from each model: a large bdmc_gap means its AIS numbers are loose.\n"
    return "\n".join(lines) + "\n" + notes


def _short(path: str, parts: int = 3) -> str:
    """Last `parts` components of a path: enough to tell checkpoints apart in a table cell."""
    p = Path(path)
    return str(Path(*p.parts[-parts:])) if len(p.parts) > parts else path


def run_name(metrics_file: Path, root: Path | None = None) -> str:
    """A run's row name: its directory relative to `root` (a sweep's job number), else the directory name."""
    run_dir = metrics_file.parent
    if root is not None and run_dir != root and root in run_dir.parents:
        return str(run_dir.relative_to(root))
    return run_dir.name


def write_comparison(out_dir: str | Path, files: Sequence[Path], root: Path | None = None) -> tuple[Path, Path]:
    """Write `comparison.md` and `comparison.json` ({run: metrics}) for the runs in `files` into `out_dir`."""
    rows: dict[str, dict[str, Any]] = {}
    for f in files:
        name = run_name(f, root)
        while name in rows:  # two runs in directories of the same name
            name += "'"
        rows[name] = load_metrics(f)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "comparison.md", out_dir / "comparison.json"
    md.write_text(comparison_table(rows))
    js.write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")
    return md, js


class CompareRuns(Callback):
    """Hydra callback (conf/eval.yaml): after a multirun, the comparison table of all its jobs in the sweep dir."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        files = find_runs([sweep_dir]) if sweep_dir.is_dir() else []
        if not files:
            log.warning("no metrics.json under %s: no comparison table written", sweep_dir)
            return
        md, _ = write_comparison(sweep_dir, files, root=sweep_dir)
        log.info("comparison of %d runs: %s", len(files), md)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m latentlab.compare", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="metrics.json files, run directories or sweep directories")
    parser.add_argument("-o", "--output", default=".", help="directory for comparison.md / comparison.json")
    args = parser.parse_args(argv)
    try:
        files = find_runs(args.paths)
    except FileNotFoundError as exc:
        parser.exit(2, f"latentlab: error: {exc}\n")
    if not files:
        parser.exit(2, "latentlab: error: no metrics.json found under the given paths\n")
    root = Path(args.paths[0]) if len(args.paths) == 1 and Path(args.paths[0]).is_dir() else None
    md, _ = write_comparison(args.output, files, root)
    print(md.read_text())


if __name__ == "__main__":
    main()
