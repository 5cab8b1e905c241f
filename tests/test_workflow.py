"""The research workflow: multirun grids, Optuna sweeps, the submitit launcher, sweep summaries, the
Python API, W&B (offline) / TensorBoard dashboards, the method-aware progress bar, and torch.compile."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as L
import pytest
import torch
import yaml

from latentlab import api
from latentlab.callbacks.dashboard import (
    MethodProgressBar,
    method_phase,
    method_plan,
    project_2d,
)
from latentlab.models import ALMOND
from latentlab.sweeps import summarize_sweep, summary_markdown, write_sweep_summary

TINY = ["trainer.max_epochs=1", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2",
        "+trainer.limit_test_batches=1", "eval.nll.k=5", "eval.val_nll.k=5", "logger=none", "callbacks.image_grid=null",
        "callbacks.progress_bar=null", "trainer.enable_model_summary=false"]


def multirun(tmp_path: Path, *overrides: str, multirun_flag: bool = True) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`python -m latentlab.train [-m] ...` with the sweep directory in tmp_path."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "-m", "latentlab.train", *(["-m"] if multirun_flag else []), *overrides, *TINY,
           f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    return proc, sweep


def job_metrics(sweep: Path) -> dict[str, dict[str, Any]]:
    return {d.name: json.loads((d / "metrics.json").read_text()) for d in sorted(sweep.iterdir())
            if (d / "metrics.json").is_file()}


def test_api_runs_leave_torchs_process_wide_switches_as_they_found_them(tmp_path: Path) -> None:
    """A run turns deterministic algorithms on (`trainer.deterministic: warn`) and their NaN fill off
    (`fill_uninitialized_memory: false`) process-wide; in a notebook, the cells after `api.train`/`api.evaluate` get
    their own settings back."""
    def settings() -> tuple[bool, bool, bool]:
        return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.utils.deterministic.fill_uninitialized_memory)

    torch.use_deterministic_algorithms(False)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        _, run_dir = api.train([*TINY, "test=false"], run_dir=tmp_path / "run")
        assert settings() == (False, False, True)
        api.evaluate(run_dir / "checkpoints" / "last.ckpt", ["logger=none", "eval.nll.k=5", "+trainer.limit_test_batches=1"])
        assert settings() == (False, False, True)
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = True


# ----- sweeps ---------------------------------------------------------------------------------


def test_grid_multirun_writes_one_run_per_job_and_a_summary(tmp_path: Path) -> None:
    proc, sweep = multirun(tmp_path, "model.latent_dim=2,4", "seed=1,2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = api.load_sweep(sweep)
    assert [r.dir.name for r in runs] == ["0", "1", "2", "3"]
    grid = {(r.config.model.latent_dim, r.config.seed) for r in runs}
    assert grid == {(2, 1), (2, 2), (4, 1), (4, 2)}
    for run in runs:
        assert (run.dir / "checkpoints" / "last.ckpt").is_file() and math.isfinite(run.metrics["val/nll"])
    by_job = {r.dir.name: r for r in runs}
    assert by_job["0"].metrics["val/nll"] != by_job["1"].metrics["val/nll"]  # the seed reached the job

    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["metric"] == "val/nll" and summary["direction"] == "minimize"
    assert summary["n_completed"] == 4 and summary["n_failed"] == 0
    values = {j["job"]: j["value"] for j in summary["jobs"]}
    assert values == {name: r.metrics["val/nll"] for name, r in by_job.items()}
    assert summary["best"]["value"] == min(values.values())
    table = (sweep / "sweep_summary.md").read_text()
    assert all(f"| {j}: model.latent_dim=" in table for j in "0123")


def test_optuna_sweep_optimises_the_metric_the_train_function_returns(tmp_path: Path) -> None:
    proc, sweep = multirun(tmp_path, "hparams_search=vae_optuna", "hydra.sweeper.n_trials=3",
                           "hydra.sweeper.sampler.n_startup_trials=3", multirun_flag=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = job_metrics(sweep)
    assert sorted(jobs) == ["0", "1", "2"]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # Optuna saw exactly what the jobs wrote as val/nll (the train function's return value)
    best_job = min(jobs, key=lambda j: jobs[j]["val/nll"])
    assert result["best_value"] == jobs[best_job]["val/nll"]
    overrides = yaml.safe_load((sweep / best_job / ".hydra" / "overrides.yaml").read_text())
    for key, value in result["best_params"].items():
        assert f"{key}={value}" in overrides
    assert 1e-4 <= result["best_params"]["model.optimizer.lr"] <= 1e-2
    assert result["best_params"]["model.latent_dim"] in (2, 4, 8, 16)
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["best"]["job"] == best_job and summary["optuna"]["best_value"] == result["best_value"]


def test_submitit_local_launcher_runs_the_jobs_in_their_own_processes(tmp_path: Path) -> None:
    proc, sweep = multirun(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "seed=1,2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = job_metrics(sweep)
    assert sorted(jobs) == ["0", "1"]
    results = sorted((sweep / ".submitit").rglob("*_result.pkl"))
    assert len(results) == 2
    returned = []
    for path in results:
        status, job_return = pickle.loads(path.read_bytes())
        assert status == "success"
        returned.append(job_return.return_value)
    assert sorted(returned) == sorted(m["val/nll"] for m in jobs.values())  # each job ran train() and returned
    assert json.loads((sweep / "sweep_summary.json").read_text())["n_completed"] == 2


def test_summary_lists_failed_jobs_and_ignores_non_finite_values(tmp_path: Path) -> None:
    values = {"0": 3.0, "1": float("nan"), "2": None, "3": 2.5}  # None: the job died before metrics.json
    for job, value in values.items():
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={job}", "model=vae"]))
        if value is not None:
            (tmp_path / job / "metrics.json").write_text(json.dumps({"val/elbo": -value, "val/nll": value}))
    summary = summarize_sweep(tmp_path, "val/nll")
    assert [j["status"] for j in summary["jobs"]] == ["completed", "completed", "failed", "completed"]
    assert summary["best"]["job"] == "3" and summary["n_failed"] == 1
    assert summarize_sweep(tmp_path, "val/elbo")["best"]["job"] == "3"  # elbo: higher is better
    assert summarize_sweep(tmp_path, "val/elbo")["direction"] == "maximize"
    md = summary_markdown(summary)
    assert "Every job: `model=vae`" in md and "| 2: seed=2 (failed) |" in md
    js, _ = write_sweep_summary(tmp_path, "val/nll", "maximize")
    assert json.loads(js.read_text())["best"]["job"] == "0"


def test_summary_never_ranks_jobs_of_different_datasets_together(tmp_path: Path) -> None:
    """digits NLL ~27 beside MNIST ~100: each dataset gets its own best, and there is no overall best."""
    for job, (data, value) in {"0": ("digits", 27.4), "1": ("mnist", 99.9), "2": ("mnist", 98.5), "3": ("digits", 28.0)}.items():
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"data={data}", f"seed={job}"]))
        (tmp_path / job / ".hydra" / "hydra.yaml").write_text(
            yaml.safe_dump({"hydra": {"runtime": {"choices": {"data": data}}}}))
        (tmp_path / job / "metrics.json").write_text(json.dumps({"val/nll": value}))
    summary = summarize_sweep(tmp_path, "val/nll")
    assert summary["best"] is None
    assert {d: b["job"] for d, b in summary["best_by_data"].items()} == {"digits": "0", "mnist": "2"}
    md = summary_markdown(summary)
    assert "Best per dataset" in md and "digits: job 0" in md and "mnist: job 2" in md and "\nBest: job" not in md


# ----- dashboards -----------------------------------------------------------------------------


class Probe(L.Callback):
    """Records what the progress bar shows at the end of each training epoch."""

    seen: ClassVar[list[dict[str, Any]]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        bar = trainer.progress_bar_callback
        assert isinstance(bar, MethodProgressBar)
        Probe.seen.append(dict(bar.get_metrics(trainer, pl_module)))


class BarProbe(L.Callback):
    """Records, at each epoch's end, what the progress bar's metrics column shows and what it would show now."""

    shown: ClassVar[list[tuple[Any, Any]]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        bar = trainer.progress_bar_callback
        BarProbe.shown.append((bar._metric_component._metrics.get("train/loss"),
                               bar.get_metrics(trainer, pl_module).get("train/loss")))


def test_progress_bar_refreshes_its_metrics_sparingly_but_shows_each_epochs_last(tmp_path: Path, monkeypatch) -> None:
    from lightning.pytorch.callbacks import RichProgressBar

    refreshes: list[int] = []
    original = RichProgressBar._update_metrics

    def counted(self: RichProgressBar, *args: Any) -> None:
        refreshes.append(1)
        original(self, *args)

    monkeypatch.setattr(RichProgressBar, "_update_metrics", counted)
    counts = {}
    for interval in (0, 1e9):
        BarProbe.shown, refreshes[:] = [], []
        api.train(["trainer.max_epochs=2", "+trainer.limit_train_batches=6", "trainer.log_every_n_steps=1", "test=false",
                   "data.val_size=0", "logger=none", "callbacks.image_grid=null",
                   f"callbacks.progress_bar.metrics_interval_s={interval}",
                   "+callbacks.bar_probe._target_=test_workflow.BarProbe"], run_dir=tmp_path / f"run{interval}")
        assert len(BarProbe.shown) == 2 and all(shown == now and shown is not None for shown, now in BarProbe.shown)
        counts[interval] = len(refreshes)
    # 12 batches: every batch refreshes at interval 0; with a long one only the first batch (nothing shown yet) and
    # each epoch's last do (the epoch-end hooks refresh in both runs)
    assert counts[0] - counts[1e9] == 12 - 3


class DrawProbe(L.Callback):
    """Counts the progress bar's redraws (Rich's `Live.refresh`, from its refresh thread) between the training's start
    and end, with the seconds and batches in between."""

    draws: ClassVar[list[int]] = []
    window: ClassVar[dict[str, float]] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        DrawProbe.window.update(draws=-len(DrawProbe.draws), seconds=-time.monotonic())

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        DrawProbe.window["draws"] += len(DrawProbe.draws)
        DrawProbe.window["seconds"] += time.monotonic()
        DrawProbe.window["batches"] = trainer.fit_loop.total_batch_idx + 1


def test_progress_bar_redraws_at_most_ten_times_a_second_in_a_terminal(tmp_path: Path, monkeypatch) -> None:
    """Lightning's Rich bar redraws up to 100 times a second, ~0.8 ms of Python each in a terminal: at a fast
    model's ~80 batches a second that was 11-13% of the run. Each batch asks for a redraw; the bar's thread may draw
    at most once per 1/10 s, plus the draws at the bar's start and stop and at epoch boundaries."""
    from rich.live import Live

    original = Live.refresh

    def counted(self: Live) -> None:
        DrawProbe.draws.append(1)
        original(self)

    monkeypatch.setattr(Live, "refresh", counted)
    DrawProbe.draws, DrawProbe.window = [], {}
    api.train(["trainer.max_epochs=2", "data.batch_size=8", "data.val_size=0", "test=false", "logger=none",
               "callbacks.image_grid=null", "+callbacks.progress_bar.console_kwargs.force_terminal=true",
               "+callbacks.draw_probe._target_=test_workflow.DrawProbe"], run_dir=tmp_path / "run")
    window = DrawProbe.window
    bound = 10 * window["seconds"] + 4 * 2 + 2
    assert window["batches"] >= 3 * bound  # asked for a redraw each batch: the test could see too many
    assert window["draws"] <= bound, window


class BarKind(L.Callback):
    """Records the Trainer's progress bar callback (None: no bar)."""

    seen: ClassVar[list[Any]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        BarKind.seen.append(trainer.progress_bar_callback)


def test_callbacks_progress_bar_null_means_no_bar_not_lightnings_own(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ProgressBar

    BarKind.seen = []
    probe = "+callbacks.kind._target_=test_workflow.BarKind"
    for extra in (["callbacks.progress_bar=null"], ["callbacks.progress_bar=null", "+trainer.enable_progress_bar=true"]):
        api.train(["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "data.val_size=0", "test=false",
                   "logger=none", "callbacks.image_grid=null", probe, *extra], run_dir=tmp_path / f"run{len(extra)}")
    assert BarKind.seen[0] is None  # the config's null
    bar = BarKind.seen[1]  # asked for Lightning's own bar explicitly
    assert isinstance(bar, ProgressBar) and not isinstance(bar, MethodProgressBar)


def offline_run_dir(run_dir: Path) -> Path:
    (found,) = (run_dir / "wandb").glob("offline-run-*")
    return found


def test_dashboard_to_wandb_offline_and_tensorboard(tmp_path: Path) -> None:
    import wandb
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Probe.seen = []
    metrics, run_dir = api.train([
        "model=almond", "model.vae_epochs=1", "sampler=mala", "model.n_chains=4", "sampler.n_steps=3",
        "model.eval_chains=4", "model.eval_langevin_steps=5", "eval.nll.k=5", "eval.val_nll.k=5", "data.batch_size=32",
        "trainer.max_epochs=2", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1", "trainer.log_every_n_steps=1", "logger=many_loggers", "callbacks=dashboard",
        "callbacks.dashboard.max_points=200", "callbacks.image_grid.n=16", "+callbacks.probe._target_=test_workflow.Probe",
        "tags=[dashboard_test]"], run_dir=tmp_path / "run")
    wandb.finish()

    # the progress bar names the method and the phase, epoch by epoch
    assert [(s["method"], s["phase"]) for s in Probe.seen] == [("almond", "VAE warm-up"), ("almond", "Langevin EM")]
    assert "train/phase" not in Probe.seen[0]

    # per-epoch means are the means of the per-step values (equal batches) the CSV logger recorded
    run = api.load_run(run_dir)
    steps = [v for s, v in run.history["train/loss"] if s >= 3]  # epoch 1: steps 3, 4, 5
    assert len(steps) == 3 and metrics["train/loss_epoch"] == pytest.approx(sum(steps) / 3, rel=1e-6)
    assert metrics["train/phase_epoch"] == 1.0

    # W&B offline: images, histograms and the evaluation table are in the run files (`wandb sync` uploads them)
    offline = offline_run_dir(run_dir)
    images = {p.name.split("_")[0] for p in (offline / "files" / "media" / "images").rglob("*.png")}
    assert {"samples", "reconstructions", "scatter"} <= images
    (table_file,) = (offline / "files" / "media" / "table").glob("evaluation_*.table.json")
    table = json.loads(table_file.read_text())
    rows = {row[0]: row for row in table["data"]}
    assert rows["test/nll"][1] == pytest.approx(metrics["test/nll"]) and rows["test/nll"][2] == pytest.approx(metrics["test/nll_se"])
    records = next(offline.glob("run-*.wandb")).read_bytes()
    for key in (b"langevin/step_size", b"langevin/accept_rate", b"langevin/chain_step_size", b"dashboard_test",
                b"method_plan", b"train/loss_epoch"):
        assert key in records, key

    # TensorBoard gets the same pictures and histograms
    tags: dict[str, set[str]] = {"images": set(), "histograms": set()}
    for events in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "histograms": 0})
        acc.Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags()[kind])
    assert {"samples", "reconstructions", "latents/scatter"} <= tags["images"]
    assert {"langevin/step_size", "langevin/accept_rate"} <= tags["histograms"]
    assert (run_dir / "latent_scatter.png").is_file()


def test_method_plan_and_phase_follow_the_warm_up() -> None:
    from latentlab.samplers import ULA

    model = ALMOND(data_dim=4, latent_dim=2, vae_epochs=2, n_chains=5, sampler=ULA(3e-3, 7))
    assert method_phase(model) == "VAE warm-up"  # epoch 0
    plan = method_plan(model, max_epochs=10)
    assert "VAE warm-up for epochs 0-1" in plan and "5 chains x 7 ULA steps" in plan
    assert "ends inside the warm-up" in method_plan(model, max_epochs=2)
    assert method_phase(ALMOND(data_dim=4, latent_dim=2)) == "Langevin EM"


def test_scatter_projection_keeps_2d_latents_and_finds_principal_axes() -> None:
    z = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(project_2d(z)[0], z)
    # points on a line in 5-d: the first principal component carries all the variance
    t = torch.linspace(-1, 1, 50)[:, None]
    line = t * torch.tensor([[1.0, 2.0, 0.0, -1.0, 0.5]])
    xy, axes = project_2d(line)
    assert axes == ("PC1", "PC2") and torch.allclose(xy[:, 1], torch.zeros(50), atol=1e-5)
    assert torch.allclose(xy[:, 0].abs(), (t[:, 0] * line[-1].norm()).abs(), atol=1e-5)


# ----- torch.compile -----------------------------------------------------------------------------


def test_compile_switch_keeps_numerics_and_checkpoints(tmp_path: Path) -> None:
    """Compiling (dynamo capture, eager backend: no C++ toolchain in a unit test) must not change what the
    model computes nor its state_dict keys, so checkpoints load into uncompiled models."""
    from torch._dynamo.utils import counters

    plain, plain_dir = api.train(TINY, run_dir=tmp_path / "plain")
    torch._dynamo.reset()
    counters.clear()
    compiled, compiled_dir = api.train(TINY + ["callbacks.compile.components=null", "callbacks.compile.backend=eager"],
                                       run_dir=tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] >= 2  # the encoder and the decoder went through dynamo
    assert compiled["train/loss"] == plain["train/loss"] and compiled["test/nll"] == plain["test/nll"]
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for d in (plain_dir, compiled_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("search", ["vae_optuna", "avb_optuna", "almond_optuna"])
def test_every_search_space_names_keys_of_the_config_it_searches(search: str) -> None:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="latentlab.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"hparams_search={search}"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.model._target_.lower().endswith(search.split("_")[0])
    for key in cfg.hydra.sweeper.params:
        assert OmegaConf.select(cfg, key, throw_on_missing=True) is not None, key
    assert cfg.optimized_metric == "val/nll" and str(cfg.hydra.sweeper.direction).endswith("minimize")


@pytest.mark.parametrize("launcher", ["submitit_local", "submitit_slurm"])
def test_launcher_configs_are_valid_submitit_parameters(launcher: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the launcher hands to submitit (as SlurmLauncher.launch maps it) passes submitit's own checks of
    executor parameters (for Slurm: sbatch options), so a typo fails here rather than on the cluster."""
    import submitit
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="latentlab.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"hydra/launcher={launcher}", f"hydra.sweep.dir={tmp_path}"],
                      return_hydra_config=True)
    launcher_obj = instantiate(cfg.hydra.launcher)
    kind = launcher_obj._EXECUTOR
    assert kind == ("slurm" if "slurm" in launcher else "local")
    params = dict(launcher_obj.params)
    assert params.pop("submitit_folder") == f"{tmp_path}/.submitit/%j"
    init = {f"{kind}_max_num_timeout": params.pop("max_num_timeout")} if "max_num_timeout" in params else {}
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun here
    executor = submitit.AutoExecutor(folder=tmp_path, cluster=kind, **init)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"{kind}_{k}": v for k, v in params.items()})
    if kind == "slurm":  # submitit's names for the sbatch options it will write
        assert executor._executor.parameters["time"] == 240 and executor._executor.parameters["gpus_per_node"] == 1
