"""A new inference method is one file plus a config: `example_method.PriorAsPosterior` trains, is evaluated
and appears in the comparison table through the posterior contract alone (docs/architecture.md)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from latentlab import api
from latentlab.compare import find_runs, write_comparison

FAST = ["trainer.max_epochs=2", "+trainer.limit_train_batches=10", "+trainer.limit_val_batches=2",
        "+trainer.limit_test_batches=2", "logger=none", "callbacks.image_grid.n=16"]
PRIOR = ["model._target_=example_method.PriorAsPosterior", "~model.num_samples", "~model.beta",
         "~model.kl_warmup_epochs", "+model.k=4"]


def test_prior_as_posterior_trains_evaluates_and_is_compared(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    metrics, run_dir = api.train([*FAST, *PRIOR, "model.latent_dim=2"], run_dir=tmp_path / "prior")
    # the evaluator chose importance sampling by itself: the posterior has a density
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["test/nll_estimator"] == "is"
    # its own bound (E_p[log p(x|z)], Jensen) lies below the IS estimate of log p(x) on the same data
    evaluated = api.evaluate(run_dir / "checkpoints" / "last.ckpt", ["eval.gaps=8", "eval.samples=0",
                                                                      "eval.bdmc=0", "eval.posterior_plots=0"])
    assert evaluated["test/inference_gap"] > 0.0
    assert evaluated["test/amortization_gap"] >= -0.05  # N(0, I) is amortized: the best local Gaussian beats it
    _, vae_dir = api.train([*FAST, "model.latent_dim=2"], run_dir=tmp_path / "vae")
    md, _ = write_comparison(tmp_path, find_runs([tmp_path / "prior", tmp_path / "vae"]), root=tmp_path)
    table = md.read_text()
    assert "prior" in table and "vae" in table
    assert metrics["test/nll"] > 0
