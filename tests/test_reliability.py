"""Training survives faults and loses nothing: SIGKILL at random points and during a checkpoint write,
resume that matches the uninterrupted run, NaN/inf in every component of every method caught with the
step, the component and the kept last good checkpoint, gradient clipping, safe loading.

Runs are tiny (digits, 5-10 batches per epoch, 1 thread). In-process runs go through
`latentlab.train.train` with a composed config; the kill tests run the real CLI in a subprocess.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from latentlab.builders import compose_config, write_json_atomic
from latentlab.callbacks.faults import FaultInjector, NumericalGuard
from latentlab.checkpointing import (
    AtomicCheckpointIO,
    RandomState,
    collect_random_state,
    remove_stale_temp_files,
    resolve_ckpt_path,
)
from latentlab.errors import CheckpointError, ConfigError, NumericalError, Preempted
from latentlab.fault_drills import AVAILABLE, KILL_DURING_SAVE, KILL_RUN, METHODS, QUIET, SMALL, cli, preempt_at
from latentlab.train import train
from trainers import quiet_trainer

def run(out: Path, *overrides: str) -> dict[str, float]:
    return train(compose_config([*QUIET, *SMALL, *overrides], output_dir=out))


def ckpt_step(out: Path) -> int:
    return int(torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["global_step"])


def same_metrics(a: dict, b: dict) -> bool:
    """Equal metrics: numbers to float round-off, strings (estimator, budget) exactly; pytest >= 9 refuses
    approx on strings."""
    return a.keys() == b.keys() and all(
        a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-6) if isinstance(b[k], (int, float)) else a[k] == b[k] for k in b)


# ----- resume -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", AVAILABLE)
def test_resume_at_epoch_boundary_matches_the_uninterrupted_run(tmp_path: Path, method: str) -> None:
    """Same seed + config: 2 epochs straight == 1 epoch, then `ckpt_path=last` to 2 epochs in the same run dir.

    Covers AVB's two optimisers and ALMOND's persistent chains (both in the checkpoint) and the global
    RNG states (shuffle order, reparameterisation noise). All ops run on one CPU thread in deterministic
    mode, so the match is exact up to float32 round-off in a different order, i.e. none expected.
    """
    straight = run(tmp_path / "straight", *METHODS[method], "trainer.max_epochs=2")
    run(tmp_path / "resumed", *METHODS[method], "trainer.max_epochs=1")
    assert ckpt_step(tmp_path / "resumed") == 5 * (2 if method == "avb" else 1)  # AVB: two optimiser steps per batch
    resumed = run(tmp_path / "resumed", *METHODS[method], "trainer.max_epochs=2", "ckpt_path=last")
    assert ckpt_step(tmp_path / "resumed") == ckpt_step(tmp_path / "straight")
    assert set(resumed) == set(straight)
    for key, value in straight.items():
        assert same_metrics({key: resumed[key]}, {key: value}), key
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert len(ckpt["optimizer_states"]) == {"vae": 1, "avb": 2, "almond": 1}[method]
    if method == "almond":
        assert ckpt["almond"]["chains"].shape[:2] == (2, 1297) and bool(torch.isfinite(ckpt["almond"]["chains"]).all())


@pytest.mark.parametrize("method", [m for m in ("vae", "avb") if m in AVAILABLE])
def test_sigterm_mid_epoch_writes_a_checkpoint_and_the_resume_is_the_uninterrupted_run(tmp_path: Path,
                                                                                       method: str) -> None:
    """SIGTERM at step 7 (epoch 1, batch 2 of 5; AVB: batch 1) -> last.ckpt at that step and `Preempted`; the
    resume continues the same training order and random streams, so every final metric is bit for bit equal."""
    straight = run(tmp_path / "straight", *METHODS[method], "trainer.max_epochs=2")
    with pytest.raises(Preempted, match="stopped by SIGTERM at training step"):
        run(tmp_path / "resumed", *METHODS[method], "trainer.max_epochs=2", *preempt_at(7))
    assert ckpt_step(tmp_path / "resumed") in (7, 8)  # AVB steps by 2
    resumed = run(tmp_path / "resumed", *METHODS[method], "trainer.max_epochs=2", "ckpt_path=last")
    assert resumed == straight


def test_sigterm_during_validation_stops_after_it_and_the_resume_is_the_uninterrupted_run(tmp_path: Path) -> None:
    """SIGTERM in the middle of epoch 0's validation (3 epochs): the validation finishes, the checkpoint is at the
    epoch's end, and the resumed run neither repeats nor loses any of it: final metrics equal bit for bit."""
    straight = run(tmp_path / "straight", "trainer.max_epochs=3")
    with pytest.raises(Preempted):
        run(tmp_path / "resumed", "trainer.max_epochs=3", *preempt_at(1), "+callbacks.preempt.in_validation=true")
    assert ckpt_step(tmp_path / "resumed") == 5
    assert run(tmp_path / "resumed", "trainer.max_epochs=3", "ckpt_path=last") == straight


def test_slurm_requeue_signal_checkpoints_requeues_and_the_requeued_job_is_the_uninterrupted_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slurm, emulated: a job (SLURM_* variables, a fake `scontrol` on PATH) gets the requeue signal (SIGUSR1,
    `#SBATCH --signal=USR1@...`) mid-epoch. Lightning's own SLURMEnvironment handles it: it saves an HPC
    checkpoint and calls `scontrol requeue <job id>`; Slurm then terminates the job (our scontrol sends
    SIGTERM to its caller, as Slurm's requeue does), which writes last.ckpt at the current step and exits
    preempted. The requeued job (same command, SLURM_RESTART_COUNT=1, no ckpt_path) resumes by itself and
    ends with every metric equal to the uninterrupted run's."""
    straight = run(tmp_path / "straight", "trainer.max_epochs=2")
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nkill -TERM $PPID\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "latentlab",
                       "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                       "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    job = tmp_path / "job"
    with pytest.raises(Preempted, match="stopped by SIGTERM at training step 7"):
        run(job, "trainer.max_epochs=2", *preempt_at(7), "+callbacks.preempt.signal=SIGUSR1")
    assert calls.read_text().split() == ["requeue", "4242"]
    assert list(job.glob("hpc_ckpt_*.ckpt")) and ckpt_step(job) == 7
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert run(job, "trainer.max_epochs=2", *preempt_at(7), "+callbacks.preempt.signal=SIGUSR1") == straight
    assert calls.read_text().split() == ["requeue", "4242"]  # the resumed job is past step 7: no second signal
    assert not list(job.glob("hpc_ckpt_*.ckpt"))  # stale once fit is done: a Slurm test pass would load it


@pytest.mark.skipif("almond" not in AVAILABLE, reason="ALMOND not available")
def test_almond_preempted_mid_epoch_resumes_from_its_run_directory_alone(tmp_path: Path) -> None:
    """The real CLI: an ALMOND run gets SIGTERM mid-epoch (step 7 = epoch 1, batch 2), exits with the
    "preempted" status and a checkpoint; `hydra.run.dir=<run> ckpt_path=last` alone (the model and every
    other override come from the run's own record) finishes it with test metrics equal to the uninterrupted
    run's, and the run's launch record `.hydra/overrides.yaml` is as it was."""
    from latentlab.entry import EXIT_PREEMPTED

    launch = [*QUIET, *SMALL, *METHODS["almond"], "trainer.max_epochs=2"]
    straight = run(tmp_path / "straight", *launch[len(QUIET) + len(SMALL):])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = cli(run_dir, *launch, *preempt_at(7))
    assert first.returncode == EXIT_PREEMPTED, first.stderr[-3000:]
    assert "latentlab: preempted: stopped by SIGTERM at training step 7" in first.stderr
    assert ckpt_step(run_dir) == 7 and (run_dir / "PREEMPTED").is_file()
    record = (run_dir / ".hydra" / "overrides.yaml").read_text()
    resumed = cli(run_dir, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {k: v for k, v in metrics.items() if k.startswith("test/")} == \
        {k: v for k, v in straight.items() if k.startswith("test/")}
    assert metrics == straight  # validation and training metrics too
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == record
    assert "ckpt_path=last" in (run_dir / ".hydra" / "resume-1" / "overrides.yaml").read_text()


def test_resume_after_the_last_epoch_reports_what_the_uninterrupted_run_did(tmp_path: Path) -> None:
    """Killed after training, while testing: the resumed run trains no more, yet its metrics.json must equal
    the uninterrupted run's (validation metrics from the checkpoint, test drawing the same random numbers)."""
    straight = run(tmp_path / "straight", "trainer.max_epochs=2")
    run(tmp_path / "killed", "trainer.max_epochs=2", "test=false")  # as if killed right after the last save
    resumed = run(tmp_path / "killed", "trainer.max_epochs=2", "ckpt_path=last")
    assert same_metrics(resumed, straight)


def test_random_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    """The saved states reproduce torch, numpy and python draws after a torch.save/torch.load(weights_only)."""
    import numpy as np

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    torch.randn(5), np.random.randn(7), random.random()  # advance: restore must not mean "reseed"
    torch.save({"s": RandomState().state_dict()}, tmp_path / "s.pt")
    expected = (torch.randn(4), np.random.randn(4), [random.random() for _ in range(4)])
    torch.randn(9), np.random.randn(9), random.random()
    RandomState().load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True)["s"])
    got = (torch.randn(4), np.random.randn(4), [random.random() for _ in range(4)])
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    assert set(collect_random_state()) == {"torch", "cuda", "numpy", "python"}


# ----- kills --------------------------------------------------------------------------------------
def test_sigkill_during_a_save_and_at_random_points_then_resume_matches(tmp_path: Path) -> None:
    """A: killed while writing its 2nd checkpoint -> last.ckpt is still the 1st, complete (the half-written
    temp file is not it). B: resumed with ckpt_path=last and SIGKILLed at a random moment, twice. C: resumed
    again, finishes. C's final metrics equal an uninterrupted run's (every resume starts at an epoch boundary),
    and the CSV log has each epoch once."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    straight = train(compose_config([*KILL_RUN, "logger=none"], output_dir=tmp_path / "straight"))

    a = cli(run_dir, *KILL_RUN, prefix=["-c", KILL_DURING_SAVE, "2"])
    assert a.returncode == -signal.SIGKILL, a.stderr[-2000:]
    assert ckpt_step(run_dir) == 10  # the epoch-1 checkpoint, intact: it loads and is the last complete one
    partial = list((run_dir / "checkpoints").glob(".last.ckpt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the kill did land in the middle of a write

    rng = random.Random(7)
    for _ in range(2):  # SIGKILL somewhere in start-up, training, validation or a save of epochs 2-4
        b = cli(run_dir, *KILL_RUN, "ckpt_path=last", kill_after=rng.uniform(0.5, 6.0))
        assert b.returncode in (0, -signal.SIGKILL), b.stderr[-2000:]
        assert ckpt_step(run_dir) in (10, 20, 30, 40)  # whatever the moment, last.ckpt is a complete checkpoint

    c = cli(run_dir, *KILL_RUN, "ckpt_path=last")
    assert c.returncode == 0, c.stderr[-3000:]
    assert ckpt_step(run_dir) == 40
    assert not list((run_dir / "checkpoints").glob("*.tmp"))  # leftovers of killed saves are cleaned up
    resumed = json.loads((run_dir / "metrics.json").read_text())
    for key, value in straight.items():
        assert same_metrics({key: resumed[key]}, {key: value}), key
    with (run_dir / "csv" / "metrics.csv").open() as fh:  # every epoch's validation logged once: none lost, none twice
        assert sorted(int(float(r["epoch"])) for r in csv.DictReader(fh) if r.get("val/nll")) == [0, 1, 2, 3]


def test_epoch_checkpoints_wait_for_min_interval_s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """min_interval_s=0 writes at every epoch's end; a long interval only at the end of training (the same state)."""
    from latentlab.checkpointing import PeriodicCheckpoint

    saves: list[int] = []
    real = PeriodicCheckpoint.save

    def counting(self: PeriodicCheckpoint, trainer: Any) -> None:
        saves.append(trainer.global_step)
        real(self, trainer)

    monkeypatch.setattr(PeriodicCheckpoint, "save", counting)
    run(tmp_path / "every", "trainer.max_epochs=3")  # SMALL sets min_interval_s=0
    assert saves == [5, 10, 15]
    saves.clear()
    run(tmp_path / "rare", "trainer.max_epochs=3", "callbacks.model_checkpoint.min_interval_s=1e6")
    assert saves == [15] and ckpt_step(tmp_path / "rare") == ckpt_step(tmp_path / "every") == 15
    with pytest.raises(ConfigError, match="min_interval_s must be a number of seconds >= 0"):
        run(tmp_path / "bad", "callbacks.model_checkpoint.min_interval_s=-1")


def test_snapshot_epochs_keep_that_epochs_state_beside_last(tmp_path: Path) -> None:
    """snapshot_epochs=[1]: epoch=1.ckpt holds the state after epoch 1 (what a 1-epoch run ends with), last.ckpt
    the final one; a snapshot resumes like any checkpoint."""
    run(tmp_path / "long", "callbacks.model_checkpoint.snapshot_epochs=[1]", "trainer.max_epochs=2")
    run(tmp_path / "short", "trainer.max_epochs=1")
    load = lambda p: torch.load(p, weights_only=True, map_location="cpu")  # noqa: E731
    snap, last = load(tmp_path / "long/checkpoints/epoch=1.ckpt"), load(tmp_path / "long/checkpoints/last.ckpt")
    short = load(tmp_path / "short/checkpoints/last.ckpt")
    assert snap["epoch"] == short["epoch"] and snap["global_step"] == short["global_step"] < last["global_step"]
    for key, value in short["state_dict"].items():
        torch.testing.assert_close(snap["state_dict"][key], value, rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "short/checkpoints").iterdir()) == ["last.ckpt"]
    with pytest.raises(ConfigError, match="snapshot_epochs must be epoch counts >= 1"):
        run(tmp_path / "bad", "callbacks.model_checkpoint.snapshot_epochs=[0]")


def test_resume_last_without_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="ckpt_path=last: there is no checkpoint .*hydra.run.dir"):
        resolve_ckpt_path("last", tmp_path / "run", search_siblings=False)
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    (tmp_path / "old" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("last", tmp_path / "new", search_siblings=True) == (tmp_path / "old/checkpoints/last.ckpt").resolve()
    with pytest.raises(CheckpointError):  # a named run directory means that run, not its neighbours
        resolve_ckpt_path("last", tmp_path / "new", search_siblings=False)


# ----- numerical faults ---------------------------------------------------------------------------
def inject(component: str, at_step: int, kind: str, after_step: bool = False) -> list[str]:
    target = f"{FaultInjector.__module__}.{FaultInjector.__name__}"
    return [f"+callbacks.inject._target_={target}", f"+callbacks.inject.component={component}",
            f"+callbacks.inject.at_step={at_step}", f"+callbacks.inject.kind={kind}",
            f"+callbacks.inject.after_step={str(after_step).lower()}"]


NAN_CASES = [  # method, component, kind, step of injection, after the step?, expected in the message
    ("vae", "encoder", "output", 7, False, "component encoder: its output became non-finite"),
    ("vae", "decoder", "param", 7, False, "component decoder: non-finite parameters"),
    ("vae", "decoder", "grad", 7, False, "non-finite gradient at training step 7.*component decoder"),
    ("vae", "encoder", "param", 8, True, "refusing to write checkpoint .* step 8.*encoder"),
    ("avb", "discriminator", "output", 14, False, "component discriminator"),
    ("avb", "encoder", "grad", 14, False, "component encoder"),
    ("avb", "decoder", "param", 14, False, "component decoder"),
    ("almond", "decoder", "output", 7, False, "diagnosis: component decoder"),
    ("almond", "sampler", "state", 7, False, "ALMOND sampler produced non-finite chain states at training step 7"),
]


@pytest.mark.parametrize("method,component,kind,step,after,message", [c for c in NAN_CASES if c[0] in AVAILABLE])
def test_nan_in_each_component_stops_with_step_component_and_last_good_checkpoint(
        tmp_path: Path, method: str, component: str, kind: str, step: int, after: bool, message: str) -> None:
    """Checkpoints every 2 steps; the fault at step `step` (epoch 1) must leave last.ckpt at the save
    before it, finite and untouched, name it in the error, and write no metrics.json."""
    every = 4 if method == "avb" else 2  # AVB steps twice per batch
    with pytest.raises(NumericalError) as info:
        run(tmp_path, *METHODS[method], "trainer.max_epochs=3", f"callbacks.model_checkpoint.every_n_train_steps={every}",
            *inject(component, step, kind, after), *(["callbacks.numerics.locate=true"] if kind == "output" else []))
    text = str(info.value)
    assert __import__("re").search(message, text), text
    kept = ckpt_step(tmp_path)
    assert kept == ((step - after) // every) * every, text  # an after-step fault hits the save at `step` itself
    assert f"Last good checkpoint: {tmp_path / 'checkpoints' / 'last.ckpt'} (epoch 1, step {kept}), kept unchanged" in text
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(bool(torch.isfinite(t).all()) for t in ckpt["state_dict"].values() if t.is_floating_point())
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.skipif("almond" not in AVAILABLE, reason="ALMOND not available")
def test_langevin_divergence_names_the_sampler_and_the_guard_switch_prevents_it(tmp_path: Path) -> None:
    """A step size so large that the Langevin chains overflow: without `sampler.guard` the run stops at
    the first E-step naming the sampler; with it, diverging moves are rejected and training finishes finite."""
    huge = [*METHODS["almond"], "sampler.step_size=1e20", "trainer.num_sanity_val_steps=0", "eval.val_nll.val_every_n_epochs=0",
            "test=false"]
    with pytest.raises(NumericalError, match="sampler produced non-finite chain states at training step 0.*sampler.guard"):
        run(tmp_path / "off", *huge)
    run(tmp_path / "on", *huge, "sampler.guard=true")
    ckpt = torch.load(tmp_path / "on" / "checkpoints" / "last.ckpt", weights_only=True)
    assert bool(torch.isfinite(ckpt["almond"]["chains"]).all())


def test_gradient_clipping_switch_clips_every_optimiser(tmp_path: Path) -> None:
    import lightning.pytorch as L

    class Probe(L.Callback):
        """Each optimiser's gradient norm as the optimiser sees it: after the guard (earlier in the list) clipped it."""

        def __init__(self) -> None:
            self.norms: list[float] = []

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            self.norms.append(float(torch.nn.utils.get_total_norm(grads)))

    from latentlab.builders import build_datamodule, build_model

    for method in AVAILABLE:
        cfg = compose_config([*QUIET, *SMALL, *METHODS[method]], output_dir=tmp_path / method)
        dm = build_datamodule(cfg)
        model = build_model(cfg, dm)
        probe = Probe()
        trainer = quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0,
                                callbacks=[NumericalGuard(gradient_clip_val=0.01), probe])
        trainer.fit(model, datamodule=dm)
        assert probe.norms and max(probe.norms) <= 0.01 * (1 + 1e-5), (method, probe.norms)


def stub_trainer(global_step: int) -> Any:
    """What the guard reads of a Trainer, for driving its hooks by hand: one process, epoch 0, batch 3."""
    from types import SimpleNamespace

    progress = SimpleNamespace(batch_progress=SimpleNamespace(current=SimpleNamespace(ready=4)))
    return SimpleNamespace(global_step=global_step, current_epoch=0, world_size=1, fit_loop=SimpleNamespace(epoch_loop=progress))


@pytest.mark.parametrize("entries,stops", [
    ({"decoder": [float("nan")]}, True),
    ({"encoder": [float("inf")], "decoder": [-float("inf")]}, True),  # inf - inf: the sum is NaN, still caught
    ({"encoder": [3e38, 3e38], "decoder": [3e38]}, False),  # finite gradients whose sum and norm overflow float32
])
def test_gradient_check_stops_on_any_nan_or_inf_entry_and_only_then(entries: dict[str, list[float]], stops: bool) -> None:
    """The guard checks gradients through their sum (one read): NaN and inf survive any sum, and a finite sum that
    overflows is rechecked entry by entry, so it stops exactly when an entry is non-finite, naming its component."""
    from latentlab.callbacks.faults import ComponentMap

    module = torch.nn.ModuleDict({"encoder": torch.nn.Linear(30, 20), "decoder": torch.nn.Linear(20, 30)})
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    for name, values in entries.items():
        module[name].weight.grad.view(-1)[:len(values)] = torch.tensor(values)
    guard = NumericalGuard()
    guard._map = ComponentMap(module)
    trainer = stub_trainer(global_step=3)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    if not stops:
        guard.on_before_optimizer_step(trainer, module, optimizer)  # type: ignore[arg-type]
        return
    with pytest.raises(NumericalError, match="non-finite gradient at training step 3.*component " + ", ".join(entries)):
        guard.on_before_optimizer_step(trainer, module, optimizer)  # type: ignore[arg-type]


DEFERRED_CASES = [  # method, component, kind, step of injection, expected; checkpoints every 2 (AVB: 4) steps
    ("vae", "decoder", "grad", 7, r"non-finite gradient at training step 7 of vae; component decoder \(found at training step 8 "),
    ("vae", "encoder", "param", 7, r"non-finite loss at training step 7 of vae \(found at training step 8 "),
    ("avb", "encoder", "grad", 14, r"non-finite gradient at training step 14 of avb; component encoder \(found at training step 16 "),
]


@pytest.mark.parametrize("method,component,kind,step,message", [c for c in DEFERRED_CASES if c[0] in AVAILABLE])
def test_deferred_checks_name_the_step_the_fault_came_in_and_keep_the_checkpoint_before_it(
        tmp_path: Path, method: str, component: str, kind: str, step: int, message: str) -> None:
    """check_every_n_steps=4 (accelerators get log_every_n_steps): the flags stay on the device, read every 4 batches
    and before each save, so the run stops at the next save or read, naming the step the fault came in at and the
    component, with last.ckpt at the save before that step."""
    every = 4 if method == "avb" else 2
    with pytest.raises(NumericalError) as info:
        run(tmp_path, *METHODS[method], "trainer.max_epochs=3", f"callbacks.model_checkpoint.every_n_train_steps={every}",
            "callbacks.numerics.check_every_n_steps=4", *inject(component, step, kind))
    text = str(info.value)
    assert __import__("re").search(message, text), text
    kept = ckpt_step(tmp_path)
    assert kept == (step // every) * every, text
    assert f"Last good checkpoint: {tmp_path / 'checkpoints' / 'last.ckpt'} (epoch 1, step {kept}), kept unchanged" in text


def test_deferred_checks_read_nothing_back_until_their_turn() -> None:
    """Deferred, the per-step loss and gradient checks make no host read (`aten::_local_scalar_dense`: a sync on a GPU,
    where auto defers them); the read at the epoch's end then names the first bad step and its component. At every
    step (CPU's default) the loss check reads once and the gradient check once per gradient (on a CPU a read is no
    sync, and reading each sum takes fewer ops than stacking them first; on an accelerator it reads once)."""
    from torch.profiler import profile

    module = torch.nn.ModuleDict({"encoder": torch.nn.Linear(30, 20), "decoder": torch.nn.Linear(20, 30)})
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    trainer = stub_trainer(global_step=3)

    def reads(guard: NumericalGuard, poison: bool) -> int:
        loss = module["decoder"](module["encoder"](torch.randn(5, 30))).sum()
        with profile() as prof:
            guard.on_before_backward(trainer, module, loss)  # type: ignore[arg-type]
            loss.backward()
            if poison:
                module["decoder"].bias.grad[0] = float("inf")
            guard.on_before_optimizer_step(trainer, module, optimizer)  # type: ignore[arg-type]
        optimizer.zero_grad()
        return sum(event.name == "aten::_local_scalar_dense" for event in prof.events())

    for every, expected in ((4, 0), (1, 1 + len(list(module.parameters())))):
        guard = NumericalGuard(check_every_n_steps=every)
        guard.on_fit_start(trainer, module)  # type: ignore[arg-type]
        assert reads(guard, poison=False) == expected, every
    guard = NumericalGuard(check_every_n_steps=4)
    guard.on_fit_start(trainer, module)  # type: ignore[arg-type]
    for step, poison in ((3, False), (4, True), (5, False)):  # an inf gradient at step 4, then finite ones
        trainer.global_step = step
        assert reads(guard, poison) == 0
    with pytest.raises(NumericalError, match=r"non-finite gradient at training step 4 of ModuleDict; component decoder "
                                             r"\(found at training step 5 .* every 4 batches on cpu"):
        guard.on_train_epoch_end(trainer, module)  # type: ignore[arg-type]


def test_checkpoint_writer_is_atomic_and_refuses_non_finite_values(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    with pytest.raises(NumericalError, match=r"refusing to write .* step 2: non-finite values in optimizer_states/0/m"):
        io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "optimizer_states": [{"m": torch.tensor([float("inf")])}],
                            "global_step": 2}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left by the refused save
    # inf as a sentinel (ModelCheckpoint's kth_value, EarlyStopping's best_score under mode=min) is not divergence
    sentinels = {"callbacks": {"ModelCheckpoint{...}": {"kth_value": torch.tensor(float("inf"))}},
                 "lr_schedulers": [{"best": torch.tensor(float("inf"))}]}
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 3, **sentinels}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 3
    (path.parent / ".last.ckpt.abc123.tmp").write_bytes(b"half a checkpoint")
    assert len(remove_stale_temp_files(path.parent)) == 1 and [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_metrics_json_is_written_whole_and_readable_by_the_team(tmp_path: Path) -> None:
    """metrics.json (and every other atomic write) gets open()'s permissions, not mkstemp's 0600, and a failed
    write leaves the previous file and no temp file behind."""
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"test/nll": 85.0})
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    with pytest.raises(TypeError):
        write_json_atomic(path, {"test/nll": object()})  # not JSON: fails half-way through the dump
    assert json.loads(path.read_text()) == {"test/nll": 85.0} and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----- safe loading -------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs code (it touches a file): what weights_only=True must never do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.marker),))


def test_resume_from_a_checkpoint_with_code_is_refused_unless_opted_in(tmp_path: Path) -> None:
    run(tmp_path / "good", "trainer.max_epochs=1")
    ckpt = torch.load(tmp_path / "good" / "checkpoints" / "last.ckpt", weights_only=True)
    marker = tmp_path / "code-ran"
    ckpt["evil"] = _Payload(str(marker))
    torch.save(ckpt, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="ckpt_weights_only=false"):
        run(tmp_path / "resume", "trainer.max_epochs=2", f"ckpt_path={tmp_path / 'evil.ckpt'}")
    assert not marker.exists() and not (tmp_path / "resume" / "metrics.json").exists()
    run(tmp_path / "trusted", "trainer.max_epochs=2", f"ckpt_path={tmp_path / 'evil.ckpt'}", "ckpt_weights_only=false")
    assert marker.exists()  # the explicit opt-in unpickles in full
