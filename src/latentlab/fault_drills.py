"""Fault drills: the smallest run of each method and drivers that run the real `latentlab-train` under
faults (SIGKILL at a moment or in the middle of a checkpoint write, SIGTERM at a step). One source for
`tests/test_reliability.py` and `benchmarks/faults.py`, importable from an installed package.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import NamedTuple

QUIET = ["logger=none", "callbacks.progress_bar=null", "callbacks.model_summary=null", "callbacks.image_grid=null",
         "+trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
# the drills resume from epoch boundaries: a checkpoint at every one (the default skips those within 30 s of the last)
EVERY_EPOCH = "callbacks.model_checkpoint.min_interval_s=0"
SMALL = ["eval.nll.k=5", "eval.val_nll.k=5", "+trainer.limit_train_batches=5", "+trainer.limit_val_batches=2",
         "+trainer.limit_test_batches=2", EVERY_EPOCH]
# Each method at its smallest: ALMOND with 2 chains x 2 Langevin steps and no warm-up (chains from epoch 0).
METHODS: dict[str, list[str]] = {
    "vae": ["model=vae"],
    "avb": ["model=avb", "eval.nll.ais_steps=5", "eval.nll.ais_chains=2", "eval.nll.ais_leapfrog=2",
            "eval.val_nll.ais_steps=5", "eval.val_nll.ais_chains=2", "eval.val_nll.ais_leapfrog=2"],
    "almond": ["model=almond", "model.n_chains=2", "sampler.n_steps=2", "model.eval_chains=2",
               "model.eval_langevin_steps=2"],
}
AVAILABLE = [m for m in METHODS if resources.files("latentlab.conf").joinpath("model", f"{m}.yaml").is_file()]



KILL_RUN = ["trainer.max_epochs=4", "+trainer.limit_train_batches=10", "+trainer.limit_val_batches=2",
            "+trainer.limit_test_batches=2", "eval.nll.k=5", "eval.val_nll.k=5", "callbacks.image_grid.n=16", "callbacks.progress_bar=null",
            "callbacks.model_summary=null", "+trainer.enable_progress_bar=false", EVERY_EPOCH]
# Runs the CLI with torch.save replaced by one that writes half of the checkpoint and then SIGKILLs its own
# process, on the n-th checkpoint save: a kill in the middle of writing last.ckpt.
KILL_DURING_SAVE = """
import io, os, runpy, signal, sys, torch
n, real_save, count = int(sys.argv.pop(1)), torch.save, [0]
def save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and "state_dict" in obj and hasattr(f, "write"):
        count[0] += 1
        if count[0] == n:
            buf = io.BytesIO(); real_save(obj, buf, *args, **kwargs); data = buf.getvalue()
            f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
sys.argv[0] = "latentlab-train"
runpy.run_module("latentlab.train", run_name="__main__")
"""


class CliRun(NamedTuple):
    returncode: int
    stderr: str
    job_seconds: float | None  # from the Hydra job's start (imports done) to the end of the process
    killed: bool
    first_save_s: float | None = None  # from the job's start to its first new last.ckpt (end of epoch 1)


def cli(run_dir: Path, *overrides: str, kill_after: float | None = None, prefix: list[str] | None = None,
        timeout: float = 240, sig: int = signal.SIGKILL, after_first_save: bool = False) -> CliRun:
    """Run latentlab-train in `run_dir`; with `kill_after`, send `sig` (SIGKILL) that many seconds after the
    Hydra job has started (its config record appears in .hydra/: imports done, training about to start).
    `after_first_save`: count `kill_after` from this run's first checkpoint save instead (an epoch boundary:
    training is running then, whatever the start-up took). `killed`: the signal was sent before the process
    ended by itself."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}

    def records() -> int:  # the launch record, then one more in .hydra/resume-N/ per relaunch into run_dir
        return len(list((run_dir / ".hydra").glob("**/config.yaml")))

    before = records()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    saved_before = ckpt.stat().st_mtime if ckpt.exists() else None
    cmd = [sys.executable, *(prefix or ["-m", "latentlab.train"]), f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.Popen(cmd, env=env, cwd=run_dir.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    deadline, started, killed, first_save = time.monotonic() + timeout, None, False, None
    while proc.poll() is None and time.monotonic() < deadline:
        if started is None and records() > before:
            started = time.monotonic()
        if started is not None and first_save is None and ckpt.exists() and ckpt.stat().st_mtime != saved_before:
            first_save = time.monotonic() - started
        clock = (started + first_save) if after_first_save and started is not None and first_save is not None \
            else (None if after_first_save else started)
        if kill_after is not None and clock is not None and time.monotonic() - clock >= kill_after:
            proc.send_signal(sig)
            killed = True
            break
        time.sleep(0.02)
    _, stderr = proc.communicate(timeout=timeout)
    end = time.monotonic()
    killed = killed or proc.returncode == -sig
    return CliRun(proc.returncode, stderr, None if started is None else end - started, killed, first_save)


def preempt_at(step: int) -> list[str]:
    """Overrides that make a run SIGTERM itself once training reaches `step` (a preemption at a known point)."""
    return ["+callbacks.preempt._target_=latentlab.callbacks.faults.SendSignal", f"+callbacks.preempt.at_step={step}"]
