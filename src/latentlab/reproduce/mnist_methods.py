"""The README's headline table: VAE vs AVB+AC vs ALMOND fitting one decoder on dynamically binarized MNIST.

Latent 32, the same decoder for every method, one stated budget. Each run is trained with `latentlab-train`
and judged by `latentlab-eval` with the standard test protocol (its estimator named in the table), each
method's own bound, the inference gap, and sample quality in latentlab's own classifier features (FID/KID are
not comparable with Inception-based numbers in papers).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from latentlab.estimators.protocol import CONVERGENCE_FLAG_NATS
from latentlab.plotting import tile_pngs
from latentlab.reproduce import Report, Table
from latentlab.reproduce.common import cell, markdown_table, train_run

METHODS = {"VAE": ["model=vae"], "AVB+AC": ["model=avb_ac"], "ALMOND": ["model=almond", "model.vae_epochs=1"]}
# no validation NLL: the table reads test metrics, and ALMOND's (64 fresh 50-step chains per validation image) costs
# about twice its training epoch on MNIST
COMMON = ["data=mnist", "data.binarize=dynamic", "model.latent_dim=32", "data.batch_size=128",
          "eval.val_nll.val_every_n_epochs=0"]
BUDGET = {
    "paper": ["trainer.max_epochs=100"],
    "cpu": ["trainer.max_epochs=5", "data.test_subset=1000"],  # ALMOND: 1 VAE + 4 Langevin epochs
    "smoke": ["trainer.max_epochs=2", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1",
              "data.test_subset=64", "model.latent_dim=4"],
}
EVAL = {"paper": [], "cpu": ["eval.samples=2000", "eval.gaps=100"],
        "smoke": ["eval.samples=100", "eval.gaps=4", "eval.bdmc=0", "eval.quality.classifier.min_steps=50"]}
# (key, sign, header): NLL and bound in nats (the bound is -ELBO, so it sits above the NLL)
COLUMNS = [("test/nll", 1, "NLL (nats)"), ("test/elbo", -1, "own bound (-ELBO)**"),
           ("test/inference_gap", 1, "inference gap (100 images)"), ("test/fid", 1, "FID*"), ("test/kid_mean", 1, "KID*"),
           ("test/precision", 1, "precision"), ("test/recall", 1, "recall")]
NOTE = """
*FID/KID/precision/recall in latentlab's own MNIST classifier features, not Inception's.
**Each method's own bound on the test set: the VAE's ELBO; AVB's ELBO with the discriminator's KL estimate;
ALMOND has no encoder of its own, so its bound is its VAE warm-up encoder's ELBO (trained for the warm-up epochs
only, then frozen), and its inference gap (-ELBO minus the NLL) measures how far the model moved from that encoder.
The NLL column is mean +/- SE over the test images (one repeat) or over repeats; the estimator column gives the
protocol, its budget and the half-budget diagnostic (estimate at half the budget minus at the full one).
"""


def estimator_cell(metrics: dict[str, Any]) -> str:
    """'ais 500x4 ... (half-budget 0.04)', flagged as metrics.md flags it (CONVERGENCE_FLAG_NATS)."""
    budget, half = str(metrics.get("test/nll_budget", "?")), metrics.get("test/nll_half_gap")
    if half is None:
        return budget
    return f"{budget} (half-budget {float(half):.2f}{', flagged' if abs(float(half)) > CONVERGENCE_FLAG_NATS else ''})"


def nll_cell(results: list[dict[str, Any]]) -> str:
    """Mean +/- SE over repeats, or over test images (the estimator's own SE) for one repeat."""
    if len(results) == 1 and "test/nll_se" in results[0]:
        return f"{float(results[0]['test/nll']):.2f} ± {float(results[0]['test/nll_se']):.2f}"
    return cell([float(m["test/nll"]) for m in results if "test/nll" in m], 2)


def run(out_dir: Path, budget: str, repeats: int) -> Report:
    from latentlab import api

    rows, samples = [], []
    for label, overrides in METHODS.items():
        results: list[dict[str, Any]] = []
        train_s = eval_s = 0.0
        for r in range(repeats):
            run_dir = out_dir / f"{label.lower().replace('+', '_')}-{r}"
            timing = run_dir / "reproduce_seconds.json"  # a finished run is reused, with the times it took
            seconds = json.loads(timing.read_text()) if timing.exists() else {}
            start = time.perf_counter()
            train_run(run_dir, [*COMMON, *overrides, f"seed={r}", *BUDGET[budget]])
            seconds.setdefault("train", time.perf_counter() - start)
            start = time.perf_counter()
            evaluated = run_dir / "eval" / "metrics.json"
            results.append(json.loads(evaluated.read_text()) if evaluated.exists() else
                           api.evaluate(run_dir / "checkpoints" / "last.ckpt", ["logger=none", *EVAL[budget]]))
            seconds.setdefault("eval", time.perf_counter() - start)
            timing.write_text(json.dumps(seconds))
            train_s, eval_s = train_s + seconds["train"], eval_s + seconds["eval"]
            if r == 0 and (run_dir / "samples.png").exists():
                samples.append((label, run_dir / "samples.png"))
        saved = json.loads((out_dir / f"{label.lower().replace('+', '_')}-0" / "eval" / "metrics.json").read_text())
        row = [label, estimator_cell(saved), nll_cell(results)]
        for key, sign, _ in COLUMNS[1:]:
            row.append(cell([sign * float(m[key]) for m in results if key in m], 2))
        rows.append([*row, f"{train_s / repeats / 60:.1f}", f"{eval_s / repeats / 60:.1f}"])
    header = ["method", "NLL estimator", *[c[2] for c in COLUMNS], "train min", "eval min"]
    return Report(markdown_table(header, rows) + NOTE, tile_pngs(out_dir / "mnist_methods.png", samples, (4.5, 4.8), side_by_side=True))


TABLE = Table("mnist_methods", "VAE vs AVB+AC vs ALMOND on dynamically binarized MNIST, latent 32, one decoder: "
              "test NLL by the standard protocol, own bound, inference gap, sample quality, time.", run)
