"""`latentlab-eval` end to end: every analysis on real checkpoints, the multirun comparison table,
W&B offline output, the classifier command, and settings refused before anything is loaded."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, open_dict

import latentlab.conf
from latentlab.config_schema import validate_eval_config
from latentlab.errors import ConfigError
from latentlab.evaluate import evaluate
from trainers import quiet_trainer

TRAIN_FAST = ["trainer.max_epochs=1", "eval.nll.k=5", "eval.val_nll.k=5", "callbacks.image_grid.n=16", "+trainer.limit_train_batches=5",
              "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", "logger=none"]
# every analysis on, each as small as still means something
EVAL_SMALL = ["eval/nll=fast", "eval.nll.estimator=ais", "eval.nll.ais_steps=10", "eval.nll.ais_chains=2",
              "eval.nll.ais_leapfrog=2", "eval.nll.max_batches=1",
              "eval.samples=150", "eval.gaps=6", "eval.bdmc=6", "eval.posterior_plots=2", "eval.posterior_draws=50",
              "eval.grid.resolution=41", "eval.gap.elbo_k=50", "eval.gap.local_steps=10", "eval.gap.local_eval_k=50",
              "eval.quality.classifier.min_steps=150", "eval.quality.metric.kid_subsets=10", "eval.quality.metric.is_splits=2"]
KEYS = ("test/nll", "test/nll_se", "test/fid", "test/kid_mean", "test/is_mean", "test/precision", "test/recall",
        "test/classifier_acc", "test/inference_gap", "test/approximation_gap", "test/amortization_gap",
        "test/bdmc_lower", "test/bdmc_upper", "test/bdmc_gap")


def run(module: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def eval_config(tmp_path: Path, *overrides: str) -> DictConfig:
    with initialize_config_module(config_module="latentlab.conf", version_base="1.3"):
        cfg = compose(config_name="eval", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.paths.data_dir = str(tmp_path / "data")
    return cfg


def test_multirun_eval_of_two_checkpoints_with_every_analysis(tmp_path: Path) -> None:
    train_sweep = tmp_path / "train"
    proc = run("latentlab.train", "-m", "model.latent_dim=2,4", *TRAIN_FAST, f"hydra.sweep.dir={train_sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = [train_sweep / job / "checkpoints" / "last.ckpt" for job in ("0", "1")]

    sweep = tmp_path / "eval"
    proc = run("latentlab.evaluate", "-m", f"ckpt_path={ckpts[0]},{ckpts[1]}", f"hydra.sweep.dir={sweep}",
               "logger=wandb", *EVAL_SMALL, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each long analysis shows a Rich bar (outside a terminal: its final state, complete)
    for bar in ("BDMC", "inference gaps", "classifier training", "sample quality"):
        assert re.search(rf"{bar} +━+ +(\d+)/\1 ", proc.stdout), f"no finished progress bar for {bar}:\n{proc.stdout[-2000:]}"
    for job, ckpt in zip(("0", "1"), ckpts):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        missing = [k for k in KEYS if k not in metrics]
        assert not missing, f"job {job} lacks {missing}"
        assert metrics["method"] == "vae" and metrics["ckpt_path"] == str(ckpt)
        # the decomposition is an identity; the BDMC gap is upper - lower
        assert metrics["test/approximation_gap"] + metrics["test/amortization_gap"] == pytest.approx(
            metrics["test/inference_gap"], abs=1e-9)
        assert metrics["test/bdmc_gap"] == pytest.approx(metrics["test/bdmc_upper"] - metrics["test/bdmc_lower"], abs=1e-9)
        assert 0.0 <= metrics["test/precision"] <= 1.0 and 0.0 <= metrics["test/recall"] <= 1.0
        assert metrics["test/classifier_acc"] > 0.5  # 10 classes: far above chance, or the FID is meaningless
        assert metrics["test/fid"] >= 0.0 and metrics["test/is_mean"] >= 1.0  # IS = exp(KL) >= 1
        md = (sweep / job / "metrics.md").read_text()
        assert "test/nll" in md and md.index("## Likelihood") < md.index("## Bounds and gaps") < md.index("## Sample quality")
        # every result says how it was obtained: estimator, budget, convergence diagnostic
        assert metrics["test/nll_estimator"] == "ais" and metrics["test/nll_budget"].startswith("ais 10x2 L=2")
        assert "test/nll_half_gap" in metrics and "half budget minus full budget" in md
        assert (sweep / job / "samples.png").is_file()
        # W&B offline: one finished run per job, with the pictures as images
        runs = list((sweep / job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
        media = {p.name.split("_")[0] for p in runs[0].rglob("*.png")}
        assert {"samples"} <= media and (("posteriors" in media) == (job == "0"))
    # the posterior picture exists for the 2-d latent model only
    assert (sweep / "0" / "posteriors.png").is_file() and not (sweep / "1" / "posteriors.png").exists()
    # the digits classifier was cached under paths.data_dir (default ./data) for the next evaluation
    assert (tmp_path / "data" / "digits" / "classifier.pt").is_file()
    # the comparison table lists both checkpoints, one row each
    table = (sweep / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert len(rows) == 2 and "0/checkpoints/last.ckpt" in rows[0] and "1/checkpoints/last.ckpt" in rows[1]
    assert set(json.loads((sweep / "comparison.json").read_text())) == {"0", "1"}
    # each analysis draws from its own stream: without BDMC, gaps and pictures the sample-quality numbers are the same
    alone = tmp_path / "alone"
    proc = run("latentlab.evaluate", f"ckpt_path={ckpts[0]}", f"hydra.run.dir={alone}", "logger=none", *EVAL_SMALL,
               "eval.bdmc=0", "eval.gaps=0", "eval.posterior_plots=0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    together = json.loads((sweep / "0" / "metrics.json").read_text())
    by_itself = json.loads((alone / "metrics.json").read_text())
    assert "test/bdmc_gap" not in by_itself
    for key in ("test/fid", "test/kid_mean", "test/is_mean", "test/precision", "test/recall"):
        assert by_itself[key] == together[key], key


@pytest.mark.parametrize("method", ["almond", "avb"])
def test_eval_of_a_method_without_an_amortized_gaussian(tmp_path: Path, method: str) -> None:
    """The same evaluator on another method: its own bound gives the inference gap (no Cremer split without an
    amortized Gaussian), and its posterior draws go into the 2-d picture."""
    proc = run("latentlab.train", f"model={method}", "model.latent_dim=2", *TRAIN_FAST, f"hydra.run.dir={tmp_path / 'run'}",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "eval"
    proc = run("latentlab.evaluate", f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={out}",
               *EVAL_SMALL, "eval.samples=0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method
    assert {"test/nll", "test/inference_gap", "test/bdmc_gap"} <= set(metrics)
    assert "test/approximation_gap" not in metrics and "test/fid" not in metrics
    assert (out / "posteriors.png").is_file()


def test_eval_of_an_mnist_run_reads_its_own_data_dir_and_its_hints_work(tmp_path: Path, shared_data_dir: Path) -> None:
    """An MNIST run trained with paths.data_dir=D is evaluated from another directory with no data options: the
    evaluator reads D. With D gone, the one-line error names fixes that the evaluator accepts: paths.data_dir=...
    (which then works) and +data_overrides.download=true (accepted as a setting, not refused as unknown)."""
    data = tmp_path / "mydata"
    (data / "mnist").mkdir(parents=True)
    for f in (shared_data_dir / "mnist").iterdir():
        (data / "mnist" / f.name).symlink_to(f)
    run_dir = tmp_path / "run"
    proc = run("latentlab.train", "data=mnist", f"paths.data_dir={data}", "data.train_subset=256", "data.val_size=64",
               "data.test_subset=64", *TRAIN_FAST, "test=false", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    fast = ["eval/nll=fast", "eval.nll.k=5", "eval.posterior_plots=0"]
    proc = run("latentlab.evaluate", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'e1'}", *fast, cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run's own data directory {data}" in proc.stdout + proc.stderr
    assert "test/nll" in json.loads((tmp_path / "e1" / "metrics.json").read_text())

    moved = data.rename(tmp_path / "moved")
    proc = run("latentlab.evaluate", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'e2'}", *fast, cwd=elsewhere)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("latentlab: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "paths.data_dir=" in errors[0] and "+data_overrides.download=true" in errors[0], errors[0]
    proc = run("latentlab.evaluate", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'e3'}", *fast,
               "+data_overrides.download=false", f"paths.data_dir={moved}", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_train_classifier_command_caches_and_reuses(tmp_path: Path) -> None:
    cfg = eval_config(tmp_path, "train_classifier=avb_toy", "eval.quality.classifier.min_steps=100")
    out = evaluate(cfg)
    # four one-hot points in four classes: perfectly separable, so a trained classifier gets all right
    assert out["test/classifier_acc"] == 1.0
    weights = tmp_path / "data" / "avb_toy" / "classifier.pt"
    stamp = weights.stat().st_mtime_ns
    assert evaluate(eval_config(tmp_path, "train_classifier=avb_toy", "eval.quality.classifier.min_steps=100")) == out
    assert weights.stat().st_mtime_ns == stamp  # read from the cache, not retrained
    with pytest.raises(ConfigError, match="no labels"):
        evaluate(eval_config(tmp_path, "train_classifier=linear_gaussian"))
    with pytest.raises(ConfigError, match="unknown dataset 'nosuch'"):
        evaluate(eval_config(tmp_path, "train_classifier=nosuch"))


@pytest.mark.parametrize("override,message", [
    ("eval.samples=-1", "eval.samples"),
    ("eval.gaps=1.5", "eval.gaps"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("eval.gap.local_lr=0", "local_lr"),
    ("eval.grid.resolution=1", "eval.grid"),
    ("eval.quality.generated=pixels", "eval.quality.generated"),
    # the top level and the trainer, as latentlab-train checks them: a typo must not read as true, or be dropped
    ("fill_uninitialized_memory=maybe", "fill_uninitialized_memory must be true or false, got 'maybe'"),
    ("flush_denormal=2", "flush_denormal must be true or false, got 2"),
    ("seed=abc", "seed must be an integer"),
    ("+sed=1", r"unknown top-level config key\(s\) sed"),
    ("+trainer.limit_test_batches=-1", "trainer.limit_test_batches"),
])
def test_bad_eval_settings_are_refused_before_the_checkpoint_is_read(tmp_path: Path, override: str, message: str) -> None:
    cfg = eval_config(tmp_path, "ckpt_path=/nonexistent/last.ckpt", override)
    with pytest.raises(ConfigError, match=message):
        evaluate(cfg)
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("choice", [f"{group}={path.stem}" for group in ("logger", "trainer")
                                    for path in sorted((Path(latentlab.conf.__file__).parent / group).glob("*.yaml"))])
def test_every_logger_and_trainer_choice_passes_the_eval_config_check(tmp_path: Path, choice: str) -> None:
    """The check refuses what latentlab-eval would not run, not what its own config groups compose to (the
    dashboard callbacks that logger=wandb|tensorboard bring along, say)."""
    validate_eval_config(eval_config(tmp_path, "ckpt_path=/nonexistent/last.ckpt", choice))


def test_a_checkpoint_from_before_the_eval_group_loses_its_model_eval_block() -> None:
    """Old checkpoints carry `model.eval` (EvalSpec) in their config and hyper-parameters; no constructor takes
    it now, so loading drops it and the evaluator's `eval.nll` decides the budget."""
    from latentlab.checkpoint_loading import drop_old_eval_block

    ckpt = {"latentlab": {"method": "vae", "config": {"model": {"latent_dim": 2, "eval": {"k": 100}}}},
            "hyper_parameters": {"latent_dim": 2, "eval": {"k": 100}}}
    drop_old_eval_block(ckpt)
    assert ckpt["latentlab"]["config"]["model"] == {"latent_dim": 2} and ckpt["hyper_parameters"] == {"latent_dim": 2}


def model_and_data(overrides: list[str], output_dir: Path) -> tuple[object, object]:
    """A model as latentlab-train builds it from `overrides`, untrained, and its data module."""
    from latentlab.builders import build_datamodule, build_model, compose_config

    cfg = compose_config(overrides, output_dir=output_dir)
    dm = build_datamodule(cfg)
    return build_model(cfg, dm), dm


@pytest.mark.parametrize("overrides", [
    ["model=vae", "data=digits", "eval/nll=fast"],
    ["model=avb", "data=digits", "eval/nll=fast", "eval.nll.ais_steps=5"],
    ["model=almond", "data=digits", "eval/nll=fast", "eval.nll.ais_steps=5"],
    ["model=denoiser", "data=gaussian_ring", "data.num_train=256", "data.num_val=64", "data.num_test=64", "model.n_levels=3"],
], ids=["vae", "avb", "almond", "denoiser"])
def test_val_and_test_numbers_do_not_depend_on_the_training_precision(tmp_path: Path, overrides: list[str]) -> None:
    """Lightning runs test steps under the training precision's autocast; latentlab's run in float32 whatever it is:
    the same weights give the same test metrics to the bit under 32-true and bf16-mixed (in bf16 they moved MNIST's
    VAE test/nll by 0.05 nats). (bf16-true/16-true convert the weights themselves: not covered, nor claimed.)"""
    import torch

    torch.manual_seed(0)
    model, dm = model_and_data(overrides, tmp_path)
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        trainer = quiet_trainer(precision=precision, limit_test_batches=2, default_root_dir=tmp_path)
        trainer.test(model, datamodule=dm, verbose=False)
        results[precision] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert results["32-true"] and results["bf16-mixed"] == results["32-true"]


def test_half_precision_weights_are_said_once_per_stage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """bf16-true stores the weights in bf16, which switching autocast off cannot undo: the run says so, once per stage;
    32-true and bf16-mixed (float32 weights) say nothing."""
    import logging

    def warnings_under(precision: str) -> list[str]:
        model, dm = model_and_data(["model=vae", "data=digits", "eval/nll=fast"], tmp_path / precision)
        trainer = quiet_trainer(precision=precision, limit_test_batches=1, default_root_dir=tmp_path)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="latentlab"):
            trainer.test(model, datamodule=dm, verbose=False)
            trainer.test(model, datamodule=dm, verbose=False)
        return [r.getMessage() for r in caplog.records if "weights (trainer.precision=" in r.getMessage()]

    half = warnings_under("bf16-true")
    assert len(half) == 1 and half[0].startswith("test metrics are computed with torch.bfloat16 weights")
    assert warnings_under("32-true") == [] and warnings_under("bf16-mixed") == []
