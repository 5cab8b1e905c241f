"""Scale-out: `trainer=ddp` with 2 CPU processes (gloo) for VAE, AVB and ALMOND, through the real command line.

Each method is trained once with 2 processes (per-process batch B) and once in this process with batch 2B
(the same effective batch, the same number of optimiser steps, the same seed and initial weights), then:

- the replicas are identical after training: every parameter (DDP averaged the gradients of each manual
  optimisation step for AVB's two players and ALMOND's two phases) and ALMOND's persistent chains, which
  also cover the examples *both* processes visited (the E-step updates are all-gathered);
- validation/test metrics agree with one process within noise: |a - b| <= Z * sqrt(se_a^2 + se_b^2) on the
  same examples (se: the standard error over examples that the LogLikelihood metric reports), i.e. the
  distributed evaluation reduces over all examples of both processes.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch

from latentlab import api

TESTS_DIR = Path(__file__).resolve().parent
B = 32          # per-process batch under DDP; one process gets 2B
STEPS = 4       # optimiser steps in each run (AVB steps both players per batch)
Z = 4.0         # standard errors: a false alarm has probability ~6e-5 per comparison

COMMON = ["data=digits", "data.test_subset=100", "trainer.max_epochs=1", f"+trainer.limit_train_batches={STEPS}",
          "trainer.num_sanity_val_steps=0", "logger=none", "callbacks.image_grid=null", "callbacks.progress_bar=null",
          "seed=7"]
METHODS = {
    "vae": ["model=vae", "eval.nll.k=20", "eval.val_nll.k=20"],
    "avb": ["model=avb", "eval.nll.ais_steps=10", "eval.val_nll.ais_steps=10", "eval.nll.ais_chains=2", "eval.val_nll.ais_chains=2", "eval.nll.ais_leapfrog=2", "eval.val_nll.ais_leapfrog=2"],
    # one warm-up epoch would leave no Langevin step in a 1-epoch run: start in the Langevin phase
    "almond": ["model=almond", "model.n_chains=4", "sampler.n_steps=3", "model.eval_chains=4",
               "model.eval_langevin_steps=5", "eval.nll.k=20", "eval.val_nll.k=20"],
}


class ReplicaDump(L.Callback):
    """Each process saves its parameters and (ALMOND) chains at the end of training, for comparison."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        state: dict[str, Any] = {"params": {k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
                                 "world_size": trainer.world_size}
        if getattr(pl_module, "chains", None) is not None:
            state.update(chains=pl_module.chains.cpu(), visited=pl_module.visited.cpu())
        torch.save(state, self.out / f"replica{trainer.global_rank}.pt")


def train_ddp(tmp_path: Path, overrides: list[str]) -> tuple[dict[str, float], Path]:
    """`python -m latentlab.train trainer=ddp trainer.devices=2 ...`: Lightning re-runs the command for rank 1."""
    out = tmp_path / "ddp"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "latentlab.train", *overrides, "trainer=ddp", "trainer.devices=2", f"data.batch_size={B}",
           "+callbacks.replicas._target_=test_ddp.ReplicaDump", f"+callbacks.replicas.out={out}", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text()), out


def within_noise(a: dict[str, float], b: dict[str, float], key: str) -> None:
    se = math.sqrt(a[f"{key}_se"] ** 2 + b[f"{key}_se"] ** 2)
    assert abs(a[key] - b[key]) <= Z * se, f"{key}: 2 processes {a[key]:.4f}, 1 process {b[key]:.4f}, se {se:.4f}"


@pytest.mark.parametrize("method", list(METHODS))
def test_two_cpu_processes_match_one(tmp_path: Path, method: str) -> None:
    overrides = COMMON + METHODS[method]
    ddp, out = train_ddp(tmp_path, overrides)
    single, _ = api.train(overrides + [f"data.batch_size={2 * B}"], run_dir=tmp_path / "single")

    r0, r1 = (torch.load(out / f"replica{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["params"].keys() == r1["params"].keys()
    for name, value in r0["params"].items():
        assert torch.equal(value, r1["params"][name]), f"replicas differ in {name}"
    if method == "almond":
        assert torch.equal(r0["chains"], r1["chains"]) and torch.equal(r0["visited"], r1["visited"])
        # each process saw STEPS batches of B distinct examples (DistributedSampler splits the epoch):
        # both replicas hold the chains of all 2 * STEPS * B of them
        assert int(r0["visited"].sum()) == 2 * STEPS * B
        ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
        assert torch.equal(ckpt["almond"]["chains"], r0["chains"])

    for key in ("val/nll", "test/nll"):
        within_noise(ddp, single, key)
    assert math.isfinite(ddp["train/loss"])
    if method == "avb":
        assert 0.0 <= ddp["val/disc_acc"] <= 1.0


@pytest.mark.parametrize("every,expected", [
    ("auto", r"non-finite loss at training step 2 .*on rank 1 of 2"),  # CPU: checked at every step
    ("4", r"non-finite (loss|gradient) at training step 2 of vae"),  # deferred, as on GPUs: read every 4 batches
])
def test_nan_on_one_rank_stops_every_rank_with_one_message(tmp_path: Path, every: str, expected: str) -> None:
    """A NaN in rank 1's encoder output only (step 2): both processes stop (at that step, or deferred at the next
    read of the flags, which every rank makes together), well within the bound (instead of rank 0 waiting in the
    gradient all-reduce), with one `latentlab: error:` line naming the step, exit status 2, and the run directory
    marked FAILED."""
    import time

    from latentlab.callbacks.faults import FaultInjector

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    target = f"{FaultInjector.__module__}.{FaultInjector.__name__}"
    cmd = [sys.executable, "-m", "latentlab.train", *COMMON, *METHODS["vae"], "trainer=ddp", "trainer.devices=2",
           "+trainer.limit_val_batches=1", "test=false", f"+callbacks.inject._target_={target}",
           "+callbacks.inject.component=encoder", "+callbacks.inject.at_step=2", "+callbacks.inject.kind=output",
           "+callbacks.inject.rank=1", f"callbacks.numerics.check_every_n_steps={every}", f"hydra.run.dir={out}"]
    start = time.monotonic()
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
                          stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - start
    errors = [line for line in proc.stderr.splitlines() if line.startswith("latentlab: error:")]
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert len(errors) == 1 and re.search(expected, errors[0]), proc.stderr[-4000:]
    assert elapsed < 180, elapsed  # start-up of two processes included; a hang would run into the timeout
    assert re.search(expected, (out / "FAILED").read_text())


def test_ddp_run_preempted_mid_epoch_resumes_to_the_uninterrupted_run(tmp_path: Path) -> None:
    """2 gloo processes, 2 epochs of 4 batches each: SIGTERM at step 6 (epoch 1, batch 2) on both ranks -> the
    preempted exit and last.ckpt at step 6; `hydra.run.dir=<run> ckpt_path=last` resumes, each rank continuing
    its own share of the same keyed epoch order, and every final metric equals the uninterrupted run's."""
    from latentlab.entry import EXIT_PREEMPTED
    from latentlab.fault_drills import preempt_at

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    launch = [*COMMON, *METHODS["vae"], "trainer=ddp", "trainer.devices=2", "trainer.max_epochs=2",
              "+trainer.limit_val_batches=1", f"data.batch_size={B}"]

    def cli(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "latentlab.train", *overrides, f"hydra.run.dir={run_dir}"],
                              check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)

    straight = cli(tmp_path / "straight", *launch)
    assert straight.returncode == 0, straight.stderr[-4000:]
    run_dir = tmp_path / "run"
    first = cli(run_dir, *launch, *preempt_at(6))
    assert first.returncode == EXIT_PREEMPTED, first.stderr[-4000:]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    resumed = cli(run_dir, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert json.loads((run_dir / "metrics.json").read_text()) == \
        json.loads((tmp_path / "straight" / "metrics.json").read_text())
