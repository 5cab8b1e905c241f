"""`latentlab-sample` end to end on tiny digits runs: samples, inpainting, denoising, for a latent model and a
denoiser; bad input ends with one line and exit status 2 before anything is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from latentlab import api
from latentlab.builders import compose_config
from latentlab.errors import ConfigError
from latentlab.sample import sample

TINY = ["data.train_subset=200", "data.val_subset=50", "data.test_subset=50", "trainer.max_epochs=1",
        "logger=none", "callbacks.image_grid=null", "data.binarize=none"]


RUNS = {"vae": ["model=vae", "model.latent_dim=4", *TINY],
        "denoiser": ["model=denoiser", "model.n_levels=4", "model.sampler.n_levels=4", "model.sampler.n_steps=5", *TINY]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """method -> last.ckpt of a one-epoch run, trained on first use."""
    root = tmp_path_factory.mktemp("runs")

    class Lazy(dict):
        def __missing__(self, method: str) -> Path:
            _, run_dir = api.train(RUNS[method], run_dir=root / method)
            self[method] = run_dir / "checkpoints" / "last.ckpt"
            return self[method]

    return Lazy()


def run_sample(tmp_path: Path, ckpt: Path, *overrides: str) -> tuple[dict[str, np.ndarray], dict]:
    out = tmp_path / "out.npz"
    cfg = compose_config([f"ckpt_path={api.quote(str(ckpt))}", f"out={api.quote(str(out))}", "latent_sampler.n_steps=20",
                          *overrides], output_dir=tmp_path, config_name="sample")
    sample(cfg)
    with np.load(out) as arrays:
        data = {k: arrays[k] for k in arrays.files}
    return data, json.loads(out.with_suffix(".json").read_text())


@pytest.mark.parametrize("method", ["vae", "denoiser"])
def test_samples_are_shaped_like_the_data_with_a_picture(method: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    arrays, record = run_sample(tmp_path, checkpoints[method], "n=6")
    assert list(arrays) == ["x"] and arrays["x"].shape == (6, 1, 8, 8) and np.isfinite(arrays["x"]).all()
    assert (tmp_path / "out.png").is_file() and record["method"] == method


@pytest.mark.parametrize("method", ["vae", "denoiser"])
@pytest.mark.parametrize("task", ["task=inpaint mask=bottom_half", "task=inpaint mask=random", "task=denoise noise=0.3"])
def test_inverse_problems_write_x_y_target_mask_and_hidden_pixel_metrics(method: str, task: str,
                                                                         checkpoints: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    arrays, record = run_sample(tmp_path, checkpoints[method], "n=5", *task.split())
    assert set(arrays) == {"x", "y", "target", "mask"}
    assert all(a.shape == (5, 1, 8, 8) for a in arrays.values())
    name = task.split()[0].split("=")[1]
    assert record[f"{name}/mse"] > 0 and f"{name}/mean_image_mse" in record and f"{name}/psnr" in record
    seen = arrays["mask"] == 1
    if name == "inpaint":  # observed pixels are kept exactly, and they are the original ones
        assert np.array_equal(arrays["x"][seen], arrays["target"][seen]) and 0 < seen.mean() < 1
    else:
        assert seen.all() and not np.allclose(arrays["y"], arrays["target"])


def test_red_solver_for_denoisers(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    arrays, record = run_sample(tmp_path, checkpoints["denoiser"], "n=4", "task=inpaint", "mask=left_half", "solver=red")
    seen = arrays["mask"] == 1
    assert np.isfinite(arrays["x"]).all() and np.array_equal(arrays["x"][seen], arrays["target"][seen])
    assert record["inpaint/mse"] > 0


def test_latent_prior_fit_then_sample_and_its_clear_errors(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """task=fit_prior writes latent_prior.pt beside the checkpoint (and the energy distances it reports); then
    prior=latent_denoiser samples images shaped like the data. A checkpoint without a prior, and a denoiser, are
    refused with a line that says what to do."""
    from latentlab.errors import CheckpointError

    ckpt = checkpoints["vae"]
    (ckpt.parent / "latent_prior.pt").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="no latent prior fitted .* task=fit_prior first"):
        run_sample(tmp_path, ckpt, "n=4", "prior=latent_denoiser")
    _, record = run_sample(tmp_path, ckpt, "n=4", "task=fit_prior", "latent_prior.steps=200", "latent_prior.n_steps=5")
    assert (ckpt.parent / "latent_prior.pt").is_file()
    assert record["fit_prior/energy_distance_learned"] >= 0 and record["fit_prior/energy_distance_standard"] >= 0
    arrays, _ = run_sample(tmp_path, ckpt, "n=5", "prior=latent_denoiser")
    assert arrays["x"].shape == (5, 1, 8, 8) and np.isfinite(arrays["x"]).all()
    # the evaluator judges both priors: N(0, I) (test/fid) and the fitted one beside the checkpoint
    metrics = api.evaluate(ckpt, ["eval.samples=100", "eval.quality.classifier.min_steps=150", "eval.nll.k=10",
                                  "eval.quality.metric.kid_subsets=5", "eval.quality.metric.is_splits=2",
                                  f"paths.data_dir={tmp_path / 'data'}"], run_dir=tmp_path / "eval")
    assert {"test/fid", "test/latent_prior_fid", "test/latent_prior_precision"} <= set(metrics)
    assert metrics["test/latent_prior_fid"] != metrics["test/fid"]
    assert "FID, learned latent prior" in (tmp_path / "eval" / "metrics.md").read_text()
    with pytest.raises(ConfigError, match="a latent prior is for latent models"):
        run_sample(tmp_path, checkpoints["denoiser"], "n=2", "task=fit_prior")


def test_eval_judges_a_denoiser_by_its_samples_and_says_nll_is_not_available(checkpoints: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    metrics = api.evaluate(checkpoints["denoiser"], ["eval.samples=100", "eval.quality.classifier.min_steps=150",
                                                     "eval.quality.metric.kid_subsets=5", "eval.quality.metric.is_splits=2",
                                                     f"paths.data_dir={tmp_path / 'data'}"], run_dir=tmp_path / "eval")
    assert {"test/fid", "test/precision", "test/recall", "test/classifier_acc"} <= set(metrics)
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert record["method"] == "denoiser" and "not available" in record["test/nll_estimator"]
    assert "test/nll" not in record


@pytest.mark.parametrize("method, train", [
    ("vae", ["model=vae", "trainer.max_epochs=5"]),
    ("almond", ["model=almond", "model.vae_epochs=4", "trainer.max_epochs=5", "model.n_chains=1"])])
def test_mnist_inpainting_by_latent_langevin_beats_the_mean_image(method: str, train: list[str], tmp_path: Path,
                                                                   shared_data_dir: Path) -> None:
    """Bottom halves of 100 MNIST test digits, completed by Langevin on z given the top half (then decoded): the
    hidden-pixel MSE must beat filling them with the mean training image, which knows nothing of the top half.
    (A completion is one posterior draw, so its expected error is the MMSE plus the posterior variance: it beats
    the mean image by less than the posterior mean would.)"""
    data = tmp_path / "data"
    (data / "mnist").mkdir(parents=True)
    for f in (shared_data_dir / "mnist").iterdir():
        (data / "mnist" / f.name).symlink_to(f)
    _, run_dir = api.train([*train, "data=mnist", f"paths.data_dir={data}", "data.train_subset=10000", "data.val_size=100",
                            "test=false", "logger=none", "callbacks.image_grid=null", "callbacks.progress_bar=null",
                            "trainer.enable_model_summary=false", "eval.val_nll.val_every_n_epochs=0"], run_dir=tmp_path / method)
    _, record = run_sample(tmp_path, run_dir / "checkpoints" / "last.ckpt", "n=100", "task=inpaint", "mask=bottom_half",
                           f"paths.data_dir={data}", "latent_sampler.n_steps=500")
    assert record["inpaint/mse"] < record["inpaint/mean_image_mse"], record


@pytest.mark.parametrize("bad, message", [("task=paint", "task='paint' is not a task"),
                                          ("prior=flow", "prior='flow' is not a prior"),
                                          ("solver=admm", "solver='admm' is not a solver"),
                                          ("task=inpaint mask=top_half", "mask='top_half' is not a mask"),
                                          ("out=samples.png", "must name a .npz file")])
def test_bad_requests_are_refused_before_the_checkpoint_is_read(bad: str, message: str, tmp_path: Path) -> None:
    cfg = compose_config(["ckpt_path=/nonexistent.ckpt", *bad.split()], output_dir=tmp_path, config_name="sample")
    with pytest.raises(ConfigError, match=message):
        sample(cfg)


def test_cli_bad_mask_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "latentlab.sample", "ckpt_path=/nonexistent.ckpt", "task=inpaint",
                           "mask=diagonal", f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("latentlab: error: mask='diagonal' is not a mask") and len(
        [line for line in lines if line.startswith("latentlab: error")]) == 1
    assert not (tmp_path / "run").exists()
