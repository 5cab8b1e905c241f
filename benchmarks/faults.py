"""Fault report: kills and preemptions survived / tried (and how many landed inside training), the DDP
NaN case, NaNs caught / injected, bad inputs refused / tried, download faults handled / tried, and
whether anything was lost.

    python benchmarks/faults.py                      # all methods, 6 kills + 4 SIGTERMs each, ~10 min on 1 CPU
    python benchmarks/faults.py --methods vae --kills 3 --sigterms 2 --no-ddp --out faults.md

Kills: per method, an uninterrupted reference run of the real CLI, then the same run SIGKILLed again
and again (every third kill lands in the middle of writing a checkpoint: torch.save writes half the file
and kills its own process; the others at a uniformly random moment of the training still to do after
the run's first save, so that they land inside training whatever the start-up takes) and
resumed each time with `ckpt_path=last`, then run to the end. A kill is survived when the `last.ckpt` it leaves is a
complete, finite checkpoint that the next run resumes from; nothing is lost when the final metrics equal
the reference run's (all resumes start at epoch boundaries, so they must match to float round-off).

SIGTERMs (preemption): per method, the same run sent SIGTERM at uniformly random moments of the
training still to do after its first save (mid-epoch included); one that lands while training runs must exit with status 143
and a checkpoint at the current step, and is resumed with nothing but `hydra.run.dir=<run>
ckpt_path=last` (the run's own record supplies every override); nothing is lost when the final metrics
equal the reference run's exactly (a resume from any step reproduces the uninterrupted run).

DDP NaN: 2 gloo processes, a NaN in rank 1's encoder output only; handled when both stop within the
bound with one `latentlab: error:` line naming the rank.

NaNs, bad inputs and downloads: the table-driven tests are the injections (`tests/test_reliability.py`:
a NaN in each component of each method, Langevin divergence; `tests/test_bad_input.py`: bad configs,
command lines, data files, checkpoints; `tests/test_download.py`: truncated/corrupted/failed transfers
against a local HTTP server); each case counts as caught/refused/handled when its test passes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch

from latentlab.entry import EXIT_PREEMPTED
from latentlab.fault_drills import AVAILABLE, KILL_DURING_SAVE, KILL_RUN, METHODS, cli

ROOT = Path(__file__).resolve().parents[1]  # tests/ are there in a checkout (not in an installed package)
DDP_BOUND_S = 180.0

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


class Reference(NamedTuple):
    """An uninterrupted run of the real CLI: what the faulted runs must end equal to."""

    overrides: list[str]
    metrics: dict[str, float]
    seconds: float      # from the Hydra job's start to the end of the process
    final_step: int
    steps_per_epoch: int
    training: tuple[float, float]  # seconds from the job's start to the first and last training step (estimated)

    def moment(self, rng: random.Random, epochs_left: int) -> float:
        """Seconds after a run's first save: a uniformly random moment of the training still to do then."""
        start, end = self.training
        return rng.uniform(0.0, (end - start) * max(epochs_left - 1, 0) / max(self.final_step // self.steps_per_epoch, 1))


def _reference(method: str, epochs: int, work: Path) -> Reference:
    overrides = [*(o for o in KILL_RUN if not o.startswith("trainer.max_epochs=")), f"trainer.max_epochs={epochs}",
                 *METHODS[method]]
    reference_dir = work / f"{method}-reference"
    reference = cli(reference_dir, *overrides)
    if reference.returncode != 0 or reference.job_seconds is None:
        raise RuntimeError(f"{method} reference run failed:\n{reference.stderr[-3000:]}")
    final = _step(reference_dir / "checkpoints" / "last.ckpt")
    # training runs from about one epoch before the first save to the last save (the mtime of last.ckpt)
    first = reference.first_save_s or 0.0
    record = reference_dir / ".hydra" / "config.yaml"
    last = (reference_dir / "checkpoints" / "last.ckpt").stat().st_mtime - record.stat().st_mtime
    epoch_s = max(last - first, 0.0) / max(epochs - 1, 1)
    return Reference(overrides, json.loads((reference_dir / "metrics.json").read_text()), reference.job_seconds,
                     final, final // epochs, (max(first - epoch_s, 0.0), max(last, first)))


def _step(path: Path) -> int:
    return int(torch.load(path, weights_only=True, map_location="cpu")["global_step"]) if path.exists() else -1


def _compare(expected: dict[str, float], run_dir: Path) -> tuple[float, bool]:
    got = json.loads((run_dir / "metrics.json").read_text())
    diffs = {k: abs(got.get(k, float("nan")) - v) / max(1.0, abs(v)) for k, v in expected.items() if isinstance(v, float)}
    worst = max(diffs.values())
    return worst, worst <= TOLERANCE and len(got) == len(expected)


def kill_campaign(method: str, kills: int, epochs: int, rng: random.Random, work: Path,
                  ref: Reference) -> dict[str, object]:
    overrides, expected, final_step = ref.overrides, ref.metrics, ref.final_step
    run_dir = work / f"{method}-killed"
    run_dir.mkdir(parents=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    tried = landed = inside = survived = 0
    finished = False
    for i in range(kills):
        resume = ["ckpt_path=last"] if last.exists() else []
        tried += 1
        if i % 3 == 2:
            run = cli(run_dir, *overrides, *resume, prefix=["-c", KILL_DURING_SAVE, "1"])  # the next save
        else:  # a random moment of the training still to do after this run's first save (an epoch boundary)
            left = epochs - _step(last) // ref.steps_per_epoch if last.exists() else epochs
            run = cli(run_dir, *overrides, *resume, kill_after=ref.moment(rng, left), after_first_save=True)
        if not run.killed:
            finished = run.returncode == 0
            if not finished:
                raise RuntimeError(f"{method}: run {i} failed:\n{run.stderr[-3000:]}")
            break
        landed += 1
        inside += _step(last) < final_step
        survived += checkpoint_intact(last)
    if not finished:
        final = cli(run_dir, *overrides, *(["ckpt_path=last"] if last.exists() else []))
        if final.returncode != 0:
            raise RuntimeError(f"{method}: final resume failed:\n{final.stderr[-3000:]}")
    worst, ok = _compare(expected, run_dir)
    return {"fault": f"SIGKILL + resume, {method}", "tried": tried, "landed": landed, "inside": inside,
            "survived": survived, "max_rel_diff": worst, "nothing_lost": ok}


def sigterm_campaign(method: str, sigterms: int, rng: random.Random, work: Path,
                     ref: Reference) -> dict[str, object]:
    """SIGTERM at random moments; a preempted run is resumed from its run directory alone."""
    overrides, expected = ref.overrides, ref.metrics
    run_dir = work / f"{method}-preempted"
    run_dir.mkdir(parents=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    tried = landed = preempted = survived = mid_epoch = 0
    finished = False
    for i in range(sigterms):
        tried += 1
        has_record = (run_dir / ".hydra" / "overrides.yaml").is_file()
        args = ["ckpt_path=last"] if has_record and last.exists() else list(overrides)  # resume without overrides
        left = (ref.final_step - _step(last)) // ref.steps_per_epoch if last.exists() else ref.final_step // ref.steps_per_epoch
        run = cli(run_dir, *args, kill_after=ref.moment(rng, left), sig=signal.SIGTERM, after_first_save=True)
        if run.returncode == 0:
            finished = True
            break
        if run.returncode == EXIT_PREEMPTED:  # landed while training ran: a checkpoint at that step
            landed += 1
            preempted += 1
            mid_epoch += _step(last) % ref.steps_per_epoch != 0
            survived += checkpoint_intact(last)
        elif run.returncode != -signal.SIGTERM:  # outside fit (start-up, testing) the default action applies
            raise RuntimeError(f"{method}: SIGTERM run {i} ended with {run.returncode}:\n{run.stderr[-3000:]}")
        else:
            landed += 1
            survived += checkpoint_intact(last)
    if not finished:
        has_record = (run_dir / ".hydra" / "overrides.yaml").is_file()
        final = cli(run_dir, *(["ckpt_path=last"] if has_record and last.exists() else overrides))
        if final.returncode != 0:
            raise RuntimeError(f"{method}: final resume failed:\n{final.stderr[-3000:]}")
    worst, ok = _compare(expected, run_dir)
    return {"fault": f"SIGTERM + resume from the run dir alone, {method}", "tried": tried, "landed": landed,
            "inside": preempted, "mid_epoch": mid_epoch, "survived": survived, "max_rel_diff": worst, "nothing_lost": ok}


def ddp_nan(work: Path) -> dict[str, object]:
    """2 gloo processes, NaN in rank 1's encoder output at step 2: both must stop, one message."""
    out = work / "ddp-nan"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    inject = ["+callbacks.inject._target_=latentlab.callbacks.faults.FaultInjector", "+callbacks.inject.component=encoder",
              "+callbacks.inject.at_step=2", "+callbacks.inject.kind=output", "+callbacks.inject.rank=1"]
    cmd = [sys.executable, "-m", "latentlab.train", "trainer=ddp", "trainer.devices=2", "trainer.max_epochs=1",
           "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
           "test=false", "logger=none", "callbacks.image_grid=null", "callbacks.progress_bar=null", *inject,
           f"hydra.run.dir={out}"]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=DDP_BOUND_S * 2,
                              stdin=subprocess.DEVNULL, check=False)
        rc, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        rc, stderr = None, ""
    seconds = time.monotonic() - start
    lines = [line for line in stderr.splitlines() if line.startswith("latentlab: error:")]
    ok = rc == 2 and seconds <= DDP_BOUND_S and len(lines) == 1 and "on rank 1 of 2" in lines[0]
    return {"fault": "NaN on DDP rank 1 of 2 (gloo)", "tried": 1, "landed": 1, "inside": 1, "survived": int(ok),
            "max_rel_diff": 0.0, "nothing_lost": ok, "note": f"both ranks stopped in {seconds:.0f} s (bound "
            f"{DDP_BOUND_S:.0f} s), {len(lines)} error line(s)"}


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
    parser.add_argument("--sigterms", type=int, default=4, help="SIGTERMs (preemptions) per method")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of each killed run (10 batches each)")
    parser.add_argument("--no-ddp", action="store_true", help="skip the 2-process DDP NaN case")
    parser.add_argument("--no-tests", action="store_true", help="skip the table-driven test counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = parser.parse_args()

    start, rng = time.monotonic(), random.Random(args.seed)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="latentlab-faults-") as tmp:
        work = Path(tmp)
        for method in args.methods:
            ref = _reference(method, args.epochs, work)
            campaigns = [lambda: kill_campaign(method, args.kills, args.epochs, rng, work, ref)] if args.kills else []
            campaigns += [lambda: sigterm_campaign(method, args.sigterms, rng, work, ref)] if args.sigterms else []
            for campaign in campaigns:
                rows.append(campaign())
                print(rows[-1], flush=True)
        if not args.no_ddp:
            rows.append(ddp_nan(work))
            print(rows[-1], flush=True)
    tests_here = (ROOT / "tests" / "test_reliability.py").is_file() and not args.no_tests
    counted = [] if not tests_here else [
        ("NaN/inf injected (loss, gradient, parameter, output, Langevin state)",
         junit_counts(["tests/test_reliability.py"], "nan or langevin")),
        ("bad input (config, command line, data file, checkpoint)", junit_counts(["tests/test_bad_input.py"])),
        ("download fault (truncated, corrupt, failing mirror, transient)", junit_counts(["tests/test_download.py"]))]

    def ratio(counts: Counter[str]) -> tuple[int, int]:
        return (sum(v for k, v in counts.items() if not k.endswith(" tried")),
                sum(v for k, v in counts.items() if k.endswith(" tried")))

    lines = ["# latentlab fault report", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {time.monotonic() - start:.0f} s", "",
             "| fault | survived / landed (of tried) | landed inside training | nothing lost |", "|---|---|---|---|"]
    for r in rows:
        extra = f", {r['mid_epoch']} mid-epoch" if "mid_epoch" in r else ""
        note = r.get("note") or f"final metrics vs uninterrupted: max rel diff {r['max_rel_diff']:.1e}"
        lines.append(f"| {r['fault']} | {r['survived']} / {r['landed']} (of {r['tried']}) | {r['inside']} of {r['tried']}{extra} | "
                     f"{'yes' if r['nothing_lost'] else 'NO'} ({note}) |")
    for label, counts in counted:
        caught, tried = ratio(counts)
        lines.append(f"| {label} | {caught} / {tried} | - | {'yes' if caught == tried else 'NO'} |")
    lines += ["", "Per test:", ""] + [f"- {k}: {counts[k]} / {counts[k + ' tried']}" for _, counts in counted
                                      for k in sorted(counts) if not k.endswith(" tried")]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
