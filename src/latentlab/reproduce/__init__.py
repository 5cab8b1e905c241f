"""`latentlab-reproduce NAME`: rerun a paper's table end to end through the normal Hydra app.

Each table is one small module with a `Table`: the runs it needs at a budget (`smoke` for CI, `cpu` for a
laptop-sized check, `paper` for the paper's own budget), how to read its numbers from those runs, the paper's
numbers to print beside ours, and a figure. Every run is an ordinary `latentlab-train` run directory under
`--out`, so any of them can be inspected, resumed or re-evaluated like any other.

    latentlab-reproduce --list
    latentlab-reproduce almond_normal_means --budget cpu --repeats 1 --out reproduce/
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger("latentlab")
BUDGETS = ("smoke", "cpu", "paper")


@dataclass
class Report:
    """What a table run produced: the markdown (ours beside the paper's) and the figure's path."""

    markdown: str
    figure: Path | None = None
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Table:
    """A paper table: `run(out_dir, budget, repeats) -> Report`; `summary` is the one line `--list` prints."""

    name: str
    summary: str
    run: Callable[[Path, str, int], Report]


def registry() -> dict[str, Table]:
    """The tables, by name. Imported here, not at module import, so `--list` and `--help` start fast."""
    from latentlab.reproduce import avb_toy, mnist_methods, normal_means

    tables = [normal_means.TABLE, avb_toy.TABLE, mnist_methods.TABLE]
    return {t.name: t for t in tables}


def machine() -> str:
    """One line naming the machine a table ran on (CPU count, torch threads, GPU if any)."""
    import os
    import platform

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads), {gpu}"


def reproduce(name: str, budget: str = "cpu", repeats: int = 1, out: str | Path = "reproduce") -> Report:
    """Run table `name` and write `<out>/<name>.md` (with its budget, date, machine and wall time)."""
    from latentlab.errors import ConfigError

    tables = registry()
    if name not in tables:
        raise ConfigError(f"unknown table {name!r}; `latentlab-reproduce --list` names them: {', '.join(tables)}")
    if budget not in BUDGETS:
        raise ConfigError(f"--budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}")
    out_dir = Path(out).resolve() / name
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = tables[name].run(out_dir, budget, repeats)
    wall = time.perf_counter() - start
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"# {name}\n\n{tables[name].summary}\n\nBudget `{budget}`, {repeats} repeat(s); {stamp} on {machine()}; "
              f"wall time {wall / 60:.1f} min.\n\n")
    report.markdown = header + report.markdown
    (out_dir / f"{name}.md").write_text(report.markdown)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="latentlab-reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help="the table to reproduce (see --list)")
    parser.add_argument("--list", action="store_true", help="name the tables and exit")
    parser.add_argument("--budget", default="cpu", help="smoke | cpu | paper (default cpu)")
    parser.add_argument("--repeats", type=int, default=1, help="independent repeats (seeds) per cell")
    parser.add_argument("--out", default="reproduce", help="directory for the runs, tables and figures")
    args = parser.parse_args(argv)
    from latentlab.errors import LatentlabError

    try:
        if args.list:
            for table in registry().values():
                print(f"{table.name:22s} {table.summary}")
            return
        if not args.name:
            parser.exit(2, "latentlab: error: name a table (latentlab-reproduce --list shows them)\n")
        report = reproduce(args.name, args.budget, args.repeats, args.out)
    except LatentlabError as exc:
        parser.exit(2, f"latentlab: error: {exc}\n")
    print(report.markdown)
    if report.figure is not None:
        print(f"figure: {report.figure}")


__all__ = ["BUDGETS", "Report", "Table", "main", "registry", "reproduce"]
