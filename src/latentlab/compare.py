"""One table comparing several evaluated runs: the point of having one evaluator for every method.

    latentlab-eval -m ckpt_path=a.ckpt,b.ckpt ...   # writes <sweep dir>/comparison.md and .json at the end
    python -m latentlab.compare outputs/eval/multiruns/<stamp> other/run/metrics.json -o table_dir

Each run is a `metrics.json` (as `latentlab-eval` and `latentlab-train` write them): flat `stage/name`
keys, `name_se` holding a standard error, plus the strings `method`, `ckpt_path` and how `test/nll` was
obtained (`test/nll_estimator`, `test/nll_budget`, a convergence diagnostic). A row is named by its job and
the overrides (`.hydra/overrides.yaml`) that set it apart from the other rows, and says its method,
estimator and budget ('?' where the run did not record them). Runs of different datasets go in separate
tables, never ranked together. Values with a standard error print as `mean ± se`; the best run per column
(where "best" has a direction) is bold, and so is any run within two standard errors of it (a tie).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("latentlab")

#: Column order of the headline metrics; any other numeric key follows alphabetically.
HEADLINE = ("test/nll", "test/elbo", "test/inference_gap", "test/approximation_gap", "test/amortization_gap",
            "test/bdmc_lower", "test/bdmc_upper", "test/bdmc_gap", "test/fid", "test/kid_mean", "test/is_mean",
            "test/precision", "test/recall", "test/latent_prior_fid", "test/latent_prior_precision",
            "test/latent_prior_recall", "test/classifier_acc")
LOWER_IS_BETTER = {"nll", "fid", "kid_mean", "inference_gap", "approximation_gap", "amortization_gap"}
HIGHER_IS_BETTER = {"elbo", "is_mean", "precision", "recall"}
LATENT_PRIOR_PREFIX = "latent_prior_"  # test/latent_prior_fid: the same metric, samples through the learned prior
TEXT_KEYS = ("method", "ckpt_path")
#: How each row's test/nll was obtained: (column, keys it may be stored under); shown after the metrics.
PROTOCOL = (("nll estimator", ("test/nll_estimator",)), ("nll budget", ("test/nll_budget",)),
            ("nll diagnostic", ("test/nll_diagnostic", "test/nll_half_gap")))
DIAGNOSTIC_FLAG = 0.1  # nats: a half-budget minus full-budget difference above this is not converged
NOT_IN_NAMES = ("logger", "hydra", "paths", "callbacks")  # where/how a run logs, not what it computes: not in names


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
            found.extend(sorted(p.rglob("metrics.json"), key=lambda f: natural_key(f.relative_to(p))))
        else:
            raise FileNotFoundError(f"{p} is neither a metrics.json nor a directory with runs")
    return found


def natural_key(path: Path) -> list[tuple[int, int, str]]:
    """Sort key under which job directory "10" follows "9"."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts]


def split_overrides(overrides: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """(overrides every job has, in order; each job's own others): what names a job within its sweep."""
    if not overrides:
        return [], []
    common = set.intersection(*(set(o) for o in overrides))
    return [o for o in overrides[0] if o in common], [[o for o in own if o not in common] for own in overrides]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --------------------------------------------------------------------------- what a run is


@dataclass
class RunRecord:
    """One row: its metrics and what identifies it (job directory, overrides, method, dataset)."""

    job: str
    metrics: dict[str, Any]
    overrides: list[str] = field(default_factory=list)
    method: str = "?"
    data: str = "?"


def _load_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else None
    except Exception:  # a foreign or half-written file: the row still shows, marked '?'
        return None


def data_of(run_dir: Path) -> str | None:
    """The dataset a run used: Hydra's `data` choice, else the data module's class, plus its test subset."""
    hydra = _load_yaml(run_dir / ".hydra" / "hydra.yaml") or {}
    choice = ((hydra.get("hydra") or {}).get("runtime") or {}).get("choices", {}).get("data")
    data = ((_load_yaml(run_dir / ".hydra" / "config.yaml") or {}).get("data") or {})
    if choice is None and isinstance(data, dict) and data.get("_target_"):
        choice = str(data["_target_"]).rsplit(".", 1)[-1].removesuffix("DataModule").lower()
    if choice is not None and isinstance(data, dict) and data.get("test_subset") is not None:
        choice += f" (test_subset={data['test_subset']})"
    return choice


def describe_run(metrics_file: Path, root: Path | None = None) -> RunRecord:
    """A metrics.json with what its run directory says about it (an evaluation's data: its checkpoint's run)."""
    metrics = load_metrics(metrics_file)
    run_dir = metrics_file.parent
    overrides = [str(o) for o in _load_yaml(run_dir / ".hydra" / "overrides.yaml") or []]
    data = metrics.get("data") or data_of(run_dir)
    if data is None and metrics.get("ckpt_path"):
        data = data_of(Path(str(metrics["ckpt_path"])).parent.parent)
    method = metrics.get("method")
    choice = next((o.split("=", 1)[1] for o in overrides if _key(o) == "model"), None)
    return RunRecord(run_name(metrics_file, root), metrics, overrides, str(method or choice or "?"), str(data or "?"))


def label_runs(records: Sequence[RunRecord]) -> dict[str, RunRecord]:
    """{row name: record}: the job, then the overrides it does not share with the other rows (`0: seed=2`);
    where it writes, what it logs to, and what the method and ckpt_path columns show are left out."""
    _, own = split_overrides([r.overrides for r in records])
    rows: dict[str, RunRecord] = {}
    for record, differing in zip(records, own):
        shown = [o for o in differing if _key(o) not in ("model", *TEXT_KEYS) and _key(o).split(".")[0] not in NOT_IN_NAMES]
        name = f"{record.job}: {' '.join(shown)}" if shown else record.job
        while name in rows:  # two runs in directories of the same name
            name += "'"
        rows[name] = record
    return rows


# --------------------------------------------------------------------------- the table


def default_columns(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Headline metrics present in any row, then the other numeric keys; `_se` keys fold into their metric,
    the convergence diagnostic goes with the protocol columns."""
    keys = {k for r in rows.values() for k in _numeric(r)}
    protocol = {k for _, names in PROTOCOL for k in names}
    values = {k for k in keys if not (k.endswith("_se") and k[:-3] in keys)} - protocol
    return [k for k in HEADLINE if k in values] + sorted(values - set(HEADLINE))


def _direction(key: str) -> int:
    name = key.split("/")[-1].removeprefix(LATENT_PRIOR_PREFIX)
    return -1 if name in LOWER_IS_BETTER else 1 if name in HIGHER_IS_BETTER else 0


def format_value(value: float | None, se: float | None = None) -> str:
    if value is None:
        return ""
    if se is None or not math.isfinite(se):
        return f"{value:.4f}"
    return f"{value:.4f} ± {se:.4f}"


def best_rows(numeric: Mapping[str, Mapping[str, float]], key: str) -> set[str]:
    """Rows that are best in `key`: the best value and every value within two standard errors of the
    difference to it (sqrt(se_a^2 + se_b^2); a missing se counts as 0). Empty without a direction or a rival."""
    sign = _direction(key)
    present = {n: m for n, m in numeric.items() if key in m and math.isfinite(m[key])}
    if not sign or len(present) < 2:
        return set()
    leader = max(present, key=lambda n: sign * present[n][key])
    se = {n: m.get(f"{key}_se", 0.0) if math.isfinite(m.get(f"{key}_se", 0.0)) else 0.0 for n, m in present.items()}
    return {n for n, m in present.items()
            if abs(m[key] - present[leader][key]) <= 2.0 * math.sqrt(se[n] ** 2 + se[leader] ** 2)}


def protocol_cells(metrics: Mapping[str, Any]) -> list[str]:
    """Estimator, budget and convergence diagnostic of a row's test/nll; '?' where not recorded."""
    cells = []
    for column, names in PROTOCOL:
        value = next((metrics[k] for k in names if metrics.get(k) is not None), None)
        if value is None:
            cells.append("?")
        elif column == "nll diagnostic":
            value = float(value)
            cells.append(f"{value:.3f}" + (" (!)" if abs(value) > DIAGNOSTIC_FLAG else ""))
        else:
            cells.append(str(value))
    return cells


def _one_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str]) -> list[str]:
    numeric = {name: _numeric(r) for name, r in rows.items()}
    best = {key: best_rows(numeric, key) for key in columns}
    text_cols = [c for c in TEXT_KEYS if any(c in r for r in rows.values())]
    protocol = any(k in r for r in rows.values() for _, names in PROTOCOL for k in names)
    header = ["run", *text_cols, *columns, *([c for c, _ in PROTOCOL] if protocol else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in rows.items():
        cells = [name, *(_short(str(r.get(c, ""))) for c in text_cols)]
        for key in columns:
            m = numeric[name]
            cell = format_value(m.get(key), m.get(f"{key}_se"))
            tie = " (tie)" if name in best[key] and len(best[key]) > 1 else ""
            cells.append(f"**{cell}**{tie}" if name in best[key] else cell)
        lines.append("| " + " | ".join(cells + (protocol_cells(r) if protocol else [])) + " |")
    return lines


NOTES = ("\nnats per example; `± x`: standard error over examples; bold: best run where the direction is clear "
         "(nll, fid, kid, gaps: lower; elbo, is, precision, recall: higher), with every run within two standard "
         "errors of the difference marked (tie). Rows of different datasets are in separate tables and never "
         "ranked together. bdmc_lower <= log p(x) <= bdmc_upper on data simulated from each model: a large "
         "bdmc_gap means its AIS numbers are loose. nll diagnostic: the estimate at half the budget minus the "
         f"estimate at the full budget; (!) over {DIAGNOSTIC_FLAG} nats: not converged.\n")


def comparison_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str] | None = None,
                     data: Mapping[str, str] | None = None) -> str:
    """{run name: metrics} -> markdown, one row per run, metrics as columns; with `data` ({run name: dataset})
    and more than one dataset, one table per dataset under its heading."""
    columns = list(columns) if columns is not None else default_columns(rows)
    groups: dict[str, dict[str, Mapping[str, Any]]] = {}
    for name, r in rows.items():
        groups.setdefault((data or {}).get(name, "?"), {})[name] = r
    if len(groups) <= 1:
        only = next(iter(groups), "?")
        lines = ([f"Data: {only}", ""] if only != "?" else []) + _one_table(rows, columns)
    else:
        lines = []
        for dataset, group in groups.items():
            lines += [f"### Data: {dataset}", "", *_one_table(group, columns), ""]
    return "\n".join(lines) + "\n" + NOTES


def _short(path: str, parts: int = 3) -> str:
    """Last `parts` components of a path: enough to tell checkpoints apart in a table cell."""
    p = Path(path)
    return str(Path(*p.parts[-parts:])) if len(p.parts) > parts else path


def run_name(metrics_file: Path, root: Path | None = None) -> str:
    """A run's job name: its directory relative to `root` (a sweep's job number), else the directory name."""
    run_dir = metrics_file.parent
    if root is not None and run_dir != root and root in run_dir.parents:
        return str(run_dir.relative_to(root))
    return run_dir.name


def write_comparison(out_dir: str | Path, files: Sequence[Path], root: Path | None = None) -> tuple[Path, Path]:
    """Write `comparison.md` and `comparison.json` ({row name: metrics}) for the runs in `files` into `out_dir`."""
    rows = label_runs([describe_run(f, root) for f in files])
    metrics = {name: {"method": r.method, **r.metrics} for name, r in rows.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "comparison.md", out_dir / "comparison.json"
    md.write_text(comparison_table(metrics, data={name: r.data for name, r in rows.items()}))
    js.write_text(json.dumps({name: {"data": r.data, **metrics[name]} for name, r in rows.items()}, indent=2,
                             sort_keys=True) + "\n")
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
