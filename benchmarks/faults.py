"""Fault report: kills survived / tried, NaNs caught / injected, bad inputs refused / tried, download
faults handled / tried, and whether anything was lost.

    python benchmarks/faults.py                      # all methods, 6 kills each, ~5 minutes on 1 CPU
    python benchmarks/faults.py --methods vae --kills 3 --out faults.md

Kills: per method, an uninterrupted reference run of the real CLI, then the same run SIGKILLed again
and again (every third kill lands in the middle of writing a checkpoint: torch.save writes half the file
and kills its own process; the others at a uniformly random moment of the job) and resumed each time
with `ckpt_path=last`, then run to the end. A kill is survived when the `last.ckpt` it leaves is a
complete, finite checkpoint that the next run resumes from; nothing is lost when the final metrics equal
the reference run's (all resumes start at epoch boundaries, so they must match to float round-off).

NaNs, bad inputs and downloads: the table-driven tests are the injections (`tests/test_reliability.py`:
a NaN in each component of each method, Langevin divergence; `tests/test_bad_input.py`: bad configs,
command lines, data files, checkpoints; `tests/test_download.py`: truncated/corrupted/failed transfers
against a local HTTP server); each case counts as caught/refused/handled when its test passes.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the fault drivers and tables live with the tests: one source of truth

from test_reliability import AVAILABLE, KILL_DURING_SAVE, KILL_RUN, METHODS, cli

TOLERANCE = 1e-6


def checkpoint_intact(path: Path) -> bool:
    """Loads with weights_only=True and holds only finite weights (or does not exist yet: nothing to lose)."""
    if not path.exists():
        return True
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - a checkpoint that does not load is exactly what we look for
        return False
    return all(bool(torch.isfinite(t).all()) for t in ckpt["state_dict"].values() if t.is_floating_point())


def kill_campaign(method: str, kills: int, epochs: int, rng: random.Random, work: Path) -> dict[str, object]:
    overrides = [*(o for o in KILL_RUN if not o.startswith("trainer.max_epochs=")), f"trainer.max_epochs={epochs}",
                 *METHODS[method]]
    reference_dir, run_dir = work / f"{method}-reference", work / f"{method}-killed"
    run_dir.mkdir(parents=True)
    reference = cli(reference_dir, *overrides)
    if reference.returncode != 0 or reference.job_seconds is None:
        raise RuntimeError(f"{method} reference run failed:\n{reference.stderr[-3000:]}")
    expected = json.loads((reference_dir / "metrics.json").read_text())
    last = run_dir / "checkpoints" / "last.ckpt"
    tried = survived = 0
    finished = False
    for i in range(kills):
        resume = ["ckpt_path=last"] if last.exists() else []
        if i % 3 == 2:
            run = cli(run_dir, *overrides, *resume, prefix=["-c", KILL_DURING_SAVE, "1"])  # the next save
        else:  # a random moment of what is left of the job (start-up included)
            done = torch.load(last, weights_only=True, map_location="cpu")["epoch"] / epochs if last.exists() else 0.0
            run = cli(run_dir, *overrides, *resume, kill_after=rng.uniform(0.0, reference.job_seconds * (1 - done)))
        if not run.killed:
            finished = run.returncode == 0
            if not finished:
                raise RuntimeError(f"{method}: run {i} failed:\n{run.stderr[-3000:]}")
            break
        tried += 1
        survived += checkpoint_intact(last)
    if not finished:
        final = cli(run_dir, *overrides, *(["ckpt_path=last"] if last.exists() else []))
        if final.returncode != 0:
            raise RuntimeError(f"{method}: final resume failed:\n{final.stderr[-3000:]}")
    got = json.loads((run_dir / "metrics.json").read_text())
    diffs = {k: abs(got.get(k, float("nan")) - v) / max(1.0, abs(v)) for k, v in expected.items() if isinstance(v, float)}
    worst = max(diffs.values())
    return {"method": method, "tried": tried, "survived": survived, "max_rel_diff": worst,
            "nothing_lost": worst <= TOLERANCE and len(got) == len(expected)}


def junit_counts(tests: list[str], select: str | None = None) -> Counter[str]:
    """{test function: passed count} and {test function + ' tried': count} from a pytest run of `tests`."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
        subprocess.run(cmd + (["-k", select] if select else []), cwd=ROOT, capture_output=True, text=True,
                       check=False)  # failures are what we count
        counts: Counter[str] = Counter()
        for case in ET.parse(report).iter("testcase"):
            name = case.get("name", "").split("[")[0]
            if case.find("skipped") is not None:
                continue
            counts[name + " tried"] += 1
            counts[name] += case.find("failure") is None and case.find("error") is None
        return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=AVAILABLE, choices=list(METHODS))
    parser.add_argument("--kills", type=int, default=6, help="SIGKILLs per method (every third during a save)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of each killed run (10 batches each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = parser.parse_args()

    start, rng = time.monotonic(), random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="latentlab-faults-") as tmp:
        for method in args.methods:
            rows.append(kill_campaign(method, args.kills, args.epochs, rng, Path(tmp)))
            print(f"kills {method}: {rows[-1]}", flush=True)
    nan = junit_counts(["tests/test_reliability.py"], "nan or langevin")
    bad = junit_counts(["tests/test_bad_input.py"])
    dl = junit_counts(["tests/test_download.py"])

    def ratio(counts: Counter[str]) -> tuple[int, int]:
        return (sum(v for k, v in counts.items() if not k.endswith(" tried")),
                sum(v for k, v in counts.items() if k.endswith(" tried")))

    lines = ["# latentlab fault report", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {time.monotonic() - start:.0f} s", "",
             "| fault | handled / tried | nothing lost |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| SIGKILL + resume, {r['method']} | {r['survived']} / {r['tried']} kills survived | "
                     f"{'yes' if r['nothing_lost'] else 'NO'} (final metrics vs uninterrupted: max rel diff {r['max_rel_diff']:.1e}) |")
    for label, counts in (("NaN/inf injected (loss, gradient, parameter, output, Langevin state)", nan),
                          ("bad input (config, command line, data file, checkpoint)", bad),
                          ("download fault (truncated, corrupt, failing mirror, transient)", dl)):
        caught, tried = ratio(counts)
        lines.append(f"| {label} | {caught} / {tried} | {'yes' if caught == tried else 'NO'} |")
    lines += ["", "Per test:", ""] + [f"- {k}: {counts[k]} / {counts[k + ' tried']}" for counts in (nan, bad, dl)
                                      for k in sorted(counts) if not k.endswith(" tried")]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
