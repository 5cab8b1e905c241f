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
COLUMNS = [("test/nll", "test/nll_se", "NLL (nats)"), ("test/gap_elbo", None, "own bound"),
           ("test/inference_gap", None, "inference gap"), ("test/fid", None, "FID*"), ("test/kid_mean", None, "KID*"),
           ("test/precision", None, "precision"), ("test/recall", None, "recall")]


def run(out_dir: Path, budget: str, repeats: int) -> Report:
    from latentlab import api

    rows, samples = [], []
    for label, overrides in METHODS.items():
        results: list[dict[str, Any]] = []
        train_s = eval_s = 0.0
        for r in range(repeats):
            run_dir = out_dir / f"{label.lower().replace('+', '_')}-{r}"
            start = time.perf_counter()
            train_run(run_dir, [*COMMON, *overrides, f"seed={r}", *BUDGET[budget]])
            train_s += time.perf_counter() - start
            start = time.perf_counter()
            results.append(api.evaluate(run_dir / "checkpoints" / "last.ckpt", ["logger=none", *EVAL[budget]]))
            eval_s += time.perf_counter() - start
            if r == 0 and (run_dir / "samples.png").exists():
                samples.append((label, run_dir / "samples.png"))
        saved = json.loads((out_dir / f"{label.lower().replace('+', '_')}-0" / "eval" / "metrics.json").read_text())
        estimator = str(saved.get("test/nll_budget", "?"))  # e.g. "is k=1000 (defensive x2)", "ais 500x4"
        row = [label, estimator]
        for key, _, _ in COLUMNS:
            row.append(cell([float(m[key]) for m in results if key in m], 2))
        rows.append([*row, f"{train_s / repeats / 60:.1f}", f"{eval_s / repeats / 60:.1f}"])
    header = ["method", "NLL estimator", *[c[2] for c in COLUMNS], "train min", "eval min"]
    note = "\n*FID/KID/precision/recall in latentlab's own MNIST classifier features, not Inception's.\n"
    return Report(markdown_table(header, rows) + note, tile_pngs(out_dir / "mnist_methods.png", samples))


TABLE = Table("mnist_methods", "VAE vs AVB+AC vs ALMOND on dynamically binarized MNIST, latent 32, one decoder: "
              "test NLL by the standard protocol, own bound, inference gap, sample quality, time.", run)
