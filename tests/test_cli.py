"""End to end through the real entry points (`python -m latentlab.train` / `latentlab.evaluate`),
as a user runs them: outputs, resume, eval, multirun, W&B offline, and every kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

FAST = ["trainer.max_epochs=1", "eval.nll.k=5", "eval.val_nll.k=5", "callbacks.image_grid.n=16", "+trainer.limit_train_batches=5",
        "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2"]


def run(module: str, *overrides: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def train(tmp_path: Path, *overrides: str, run_dir: str = "run") -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path / run_dir
    proc = run("latentlab.train", f"hydra.run.dir={out}", *overrides, cwd=tmp_path)
    return proc, out


def test_default_run_writes_the_run_directory_contract(tmp_path: Path) -> None:
    proc, out = train(tmp_path, "trainer.max_epochs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("train/loss", "val/elbo", "val/kl", "val/recon", "val/nll", "test/nll", "test/elbo"):
        assert key in metrics, key
    # log-likelihood bound: NLL (IS, k samples) can't be worse than the negative ELBO on the same split, up to MC noise
    assert metrics["test/nll"] <= -metrics["test/elbo"] + 1.0
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / ".hydra" / "config.yaml").is_file()
    assert (out / "samples.png").is_file() and (out / "reconstructions.png").is_file()
    assert (out / "csv" / "metrics.csv").is_file()


def test_resume_from_last_checkpoint_continues_training(tmp_path: Path) -> None:
    proc, out = train(tmp_path, *FAST, run_dir="first")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "checkpoints" / "last.ckpt"
    proc2, out2 = train(tmp_path, *FAST[1:], "trainer.max_epochs=2", f"ckpt_path={ckpt}", run_dir="resumed")
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    first = torch.load(ckpt, weights_only=True, map_location="cpu")
    resumed = torch.load(out2 / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert first["global_step"] == 5 and resumed["global_step"] == 10  # 5 batches in each of 2 epochs
    assert resumed["epoch"] == first["epoch"] + 1


def test_lightning_model_checkpoint_with_its_inf_sentinel_saves_and_resumes(tmp_path: Path) -> None:
    """`callbacks=none` leaves Lightning's own ModelCheckpoint, whose state holds kth_value = inf (mode=min): a
    sentinel, not divergence, so the finiteness checks on writing and on resuming must let it through."""
    fast = [o for o in FAST if not o.startswith("callbacks.")]
    proc, out = train(tmp_path, *fast, "callbacks=none", run_dir="first")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ckpt,) = (out / "csv").glob("**/checkpoints/*.ckpt")
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert any(torch.isinf(v.get("kth_value", torch.zeros(()))) for v in saved["callbacks"].values())
    proc2, _ = train(tmp_path, *fast[1:], "callbacks=none", "trainer.max_epochs=2", f"ckpt_path='{ckpt}'",
                     run_dir="resumed")
    assert proc2.returncode == 0, proc2.stderr[-3000:]


def test_eval_of_a_checkpoint_writes_metrics(tmp_path: Path) -> None:
    proc, out = train(tmp_path, *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    eval_dir = tmp_path / "eval"
    proc = run("latentlab.evaluate", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={eval_dir}",
               "eval.nll.k=5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["method"] == "vae" and "test/nll" in metrics
    assert "test/nll" in (eval_dir / "metrics.md").read_text()


def test_multirun_makes_one_directory_per_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run("latentlab.train", "-m", "model.latent_dim=2,4", *FAST, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dims = []
    for job in ("0", "1"):
        assert (sweep / job / "metrics.json").is_file()
        dims.append(yaml.safe_load((sweep / job / ".hydra" / "config.yaml").read_text())["model"]["latent_dim"])
    assert dims == [2, 4]


def test_mnist_subset_runs(tmp_path: Path, shared_data_dir: Path) -> None:
    proc, out = train(tmp_path, "data=mnist", f"paths.data_dir={shared_data_dir}", "data.train_subset=500",
                      "data.test_subset=200", "data.binarize=dynamic", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test/nll" in json.loads((out / "metrics.json").read_text())


def test_wandb_offline_writes_run_files_without_login(tmp_path: Path) -> None:
    proc, out = train(tmp_path, "logger=wandb", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb")), "no offline W&B run file"
    media = list(runs[0].rglob("*.png"))
    assert media, "images were not logged to W&B"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model=nosuchmodel"], "nosuchmodel"),
        (["model.latent_dim=0"], "latent_dim"),
        (["model.latent_dim=-3"], "latent_dim"),
        (["model.optimizer.lr=-0.1"], "lr"),
        (["data.batch_size=0"], "batch_size"),
        (["data=mnist", "paths.data_dir=/nonexistent/latentlab-data"], "/nonexistent/latentlab-data"),
    ],
)
def test_bad_input_fails_before_training_with_a_clear_message(tmp_path: Path, overrides: list[str], message: str) -> None:
    proc, out = train(tmp_path, *overrides)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "metrics.json").exists() and not (out / "checkpoints").exists()


def test_corrupted_data_file_is_refused(tmp_path: Path, shared_data_dir: Path) -> None:
    bad = tmp_path / "data" / "mnist"
    bad.mkdir(parents=True)
    for f in (shared_data_dir / "mnist").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    target = bad / "t10k-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:-1000])  # truncated
    proc, out = train(tmp_path, "data=mnist", f"paths.data_dir={tmp_path / 'data'}")
    assert proc.returncode != 0
    assert "t10k-images-idx3-ubyte.gz" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml")))
def test_every_shipped_experiment_builds_its_data_and_model(experiment: str, shared_data_dir: Path, tmp_path: Path) -> None:
    """The paper settings are for someone with a GPU to run: they must at least compose and build here."""
    from latentlab.builders import build_datamodule, build_model, compose_config, resolve_paths

    cfg = compose_config([f"experiment={experiment}", f"paths.data_dir={shared_data_dir}"], output_dir=tmp_path)
    resolve_paths(cfg)
    model = build_model(cfg, build_datamodule(cfg))
    assert model.latent_dim == cfg.model.latent_dim and cfg.trainer.max_epochs >= 1


# ----- one error path, nothing half-made ------------------------------------------------------------
def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("latentlab: error:")]


def test_a_refused_command_leaves_no_run_directory(tmp_path: Path) -> None:
    """A value only the data module's constructor can refuse (after Hydra made the run directory): one line,
    exit 2, and neither the named run directory nor a timestamped one under outputs/ is left behind."""
    proc, out = train(tmp_path, "data.binarize=dynamc")
    assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1, proc.stderr[-2000:]
    assert "data.binarize must be one of" in proc.stderr and "Traceback" not in proc.stderr
    assert "Seed set" not in proc.stdout + proc.stderr  # said only once the config has built
    assert not out.exists()
    proc = run("latentlab.train", "data.binarize=dynamc", cwd=tmp_path)  # Hydra's own timestamped directory
    assert proc.returncode == 2
    assert not list((tmp_path / "outputs").glob("*/runs/*"))


def test_a_run_failing_after_it_started_keeps_its_directory_marked_failed(tmp_path: Path) -> None:
    target = "latentlab.callbacks.faults.FaultInjector"
    proc, out = train(tmp_path, *FAST, f"+callbacks.inject._target_={target}", "+callbacks.inject.component=decoder",
                      "+callbacks.inject.at_step=2", "+callbacks.inject.kind=param")
    assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1, proc.stderr[-2000:]
    assert (out / "FAILED").read_text().startswith("latentlab: error: non-finite")
    assert not (out / "metrics.json").exists()


def test_a_failing_job_of_a_multirun_is_reported_and_the_sweep_goes_on(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run("latentlab.train", "-m", "data.binarize=dynamc,none", *FAST, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert len(error_lines(proc.stderr)) == 1 and "data.binarize must be one of" in proc.stderr, proc.stderr[-2000:]
    assert (sweep / "0" / "FAILED").is_file() and (sweep / "1" / "metrics.json").is_file()


def test_console_shows_each_lightning_message_once_and_no_noise_from_latentlab(tmp_path: Path) -> None:
    proc, _ = train(tmp_path, *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert console.count("Seed set to 12345") == 1, console[-3000:]
    for noise in ("Trainer already configured with model summary", "💡 Tip", "is deprecated"):
        assert noise not in console, noise


# ----- resume from the run directory alone ----------------------------------------------------------
def fake_run(root: Path, name: str, target: str, overrides: list[str], mtime: float) -> Path:
    run_dir = root / name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "checkpoints").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"model": {"_target_": target}}))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(b"")
    os.utime(ckpt, (mtime, mtime))
    return run_dir


def test_resume_plan_rebuilds_the_runs_overrides_and_picks_the_newest_run_of_the_method(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from latentlab.resume import plan_relaunch

    runs = tmp_path / "outputs" / "train" / "runs"
    almond = fake_run(runs, "a", "latentlab.models.ALMOND", ["model=almond", "trainer.max_epochs=2"], 100.0)
    fake_run(runs, "b", "latentlab.models.VAE", ["model.latent_dim=4"], 200.0)
    said: list[str] = []

    def compose(overrides: list[str]) -> object:
        target = "latentlab.models.ALMOND" if "model=almond" in overrides else "latentlab.models.VAE"
        return OmegaConf.create({"hydra": {"run": {"dir": str(runs / "new")}}, "model": {"_target_": target}})

    # from the run directory: its overrides, the ones given now on top, the record beside the original
    plan = plan_relaunch([f"hydra.run.dir={almond}", "ckpt_path=last", "trainer.max_epochs=3"], compose, said.append)
    assert plan == ["model=almond", f"hydra.run.dir={almond}", "ckpt_path=last", "trainer.max_epochs=3",
                    "hydra.output_subdir=.hydra/resume-1"]
    (almond / ".hydra" / "resume-1").mkdir()
    assert plan_relaunch([f"hydra.run.dir={almond}", "ckpt_path=last"], compose, said.append)[-1] == \
        "hydra.output_subdir=.hydra/resume-2"
    # ckpt_path=last alone: the newest run of the method the command builds, named; ambiguity said
    plan = plan_relaunch(["ckpt_path=last", "model=almond"], compose, said.append)
    assert f"hydra.run.dir={almond}" in plan and "model=almond" in plan and str(almond) in said[-1]
    plan = plan_relaunch(["ckpt_path=last"], compose, said.append)
    assert f"hydra.run.dir={runs / 'b'}" in plan and "model.latent_dim=4" in plan
    said.clear()
    os.utime(almond / "checkpoints" / "last.ckpt", (300.0, 300.0))
    plan_relaunch(["ckpt_path=last"], compose, said.append)
    assert "ambiguous" in said[-1] and "model=almond" in said[-1]


def test_a_failing_job_of_an_eval_multirun_is_reported_and_the_sweep_goes_on(tmp_path: Path) -> None:
    proc, out = train(tmp_path, *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "eval-sweep"
    good, missing = out / "checkpoints" / "last.ckpt", tmp_path / "nothing.ckpt"
    proc = run("latentlab.evaluate", "-m", f"ckpt_path={missing},{good}", "eval.nll.k=5", f"hydra.sweep.dir={sweep}",
               cwd=tmp_path)
    assert len(error_lines(proc.stderr)) == 1 and "nothing.ckpt" in error_lines(proc.stderr)[0], proc.stderr[-2000:]
    assert (sweep / "0" / "FAILED").is_file() and (sweep / "1" / "metrics.json").is_file()
