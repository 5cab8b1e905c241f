"""ALMOND's many-normal-means table (Qiu & Wang; yixuan/almond, experiments/many-normal-means).

x_i = mu_i + N(0, 1), n = 1000, mu_i ~ pi for three priors. Each method estimates pi: empirical Bayes as
N(x-bar, s^2 - 1), the VAE and ALMOND as the law of the decoder mean h(z), z ~ N(0, 1). As in the official scripts
(03_mix.py: `model.fit` for the VAE, `simulate_prior`, then `model.fit_bc` on the same model), the VAE is ALMOND's
own warm-up: its decoder at the end of the warm-up, which each ALMOND run keeps as checkpoints/epoch=<vae_epochs>.ckpt
(so three runs, not six, and each ALMOND is compared with the VAE it started from). The yardsticks are the
official ones (experiments/many-normal-means/04_plots.R, 02_exp.py): the one-sample Kolmogorov-Smirnov distance D
of 10000 draws of the estimate to the exact CDF of pi, and the 1-Wasserstein distance W between 10000 draws of
the estimate and 10000 of pi. (Two-sample KS on 5000 + 5000 draws, as the training callback's test/ks, has about
twice the noise floor: it read 0.054 for ALMOND's exponential prior where this reads 0.042.)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from latentlab.reproduce import Report, Table
from latentlab.reproduce.common import cell, markdown_table, train_runs

PRIORS = ("normal", "exponential", "mixture")
N_DRAWS = 10000
# the official figure (experiments/results/mnn_example.pdf, seed 123) as D / W
PAPER = {
    "normal": {"eb": (0.048, 0.079), "vae": (0.059, 0.101), "almond": (0.045, 0.081)},
    "exponential": {"eb": (0.161, 0.615), "vae": (0.086, 0.208), "almond": (0.024, 0.041)},
    "mixture": {"eb": (0.168, 0.474), "vae": (0.114, 0.306), "almond": (0.078, 0.172)},
}
# experiment defaults are the paper's budget; the others shorten it
BUDGET = {
    "paper": [],
    "cpu": ["trainer.max_epochs=1200"],  # the full VAE warm-up, then 200 Langevin epochs (of the paper's 1000)
    "smoke": ["model.vae_epochs=2", "trainer.max_epochs=4", "model.n_chains=4"],
}
METHODS = ("vae", "almond")  # the VAE: each ALMOND run's warm-up snapshot
# the official mixture script: a 1-50-100-50-1 decoder, 100 reparameterised draws per example in the VAE
PER_PRIOR = {"mixture": ["net.hidden_dims=[50,100,50]", "model.vae_num_samples=100"]}


def empirical_bayes(prior: str, data_seed: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(estimated, true) draws of pi, N_DRAWS each: empirical Bayes fits N(x-bar, max(s^2 - 1, 0))."""
    from latentlab.data import NormalMeansDataModule

    dm = NormalMeansDataModule(prior=prior, data_seed=data_seed)
    dm.setup("fit")
    x = dm.data("train").reshape(-1)
    var = max(float(x.var()) - 1.0, 1e-6)
    estimate = float(x.mean()) + var**0.5 * torch.randn(N_DRAWS, generator=generator)
    return estimate, true_draws(dm)


def true_draws(dm: object) -> torch.Tensor:
    """N_DRAWS draws of the true pi, under a forked global RNG (torch.distributions has no generator)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return dm.prior_distribution().sample((N_DRAWS,)).reshape(-1)  # type: ignore[attr-defined]


def distances(estimate: torch.Tensor, truth: torch.Tensor, prior: str) -> tuple[float, float]:
    """(D: one-sample KS of the estimate's draws to pi's exact CDF, W: W1 between the estimate's and pi's draws)."""
    from scipy import stats

    from latentlab.data import NormalMeansDataModule

    pi = NormalMeansDataModule(prior=prior).prior_distribution()
    lower = getattr(pi.support, "lower_bound", None)  # the exponential's CDF is 0 below its support

    def cdf(v: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(v, dtype=torch.float64)
        return pi.cdf(t if lower is None else t.clamp(min=float(lower))).numpy()

    e = estimate.double().reshape(-1).numpy()
    return float(stats.kstest(e, cdf).statistic), float(stats.wasserstein_distance(e, truth.double().reshape(-1).numpy()))


def learned_prior(run_dir: Path, method: str) -> torch.Tensor:
    """N_DRAWS draws of h(z), z ~ N(0, 1), from a finished ALMOND run: its last checkpoint, or (the VAE) its
    warm-up snapshot."""
    from latentlab import api
    from latentlab.callbacks.latents import learned_latents

    if method == "vae":
        snapshots = sorted((run_dir / "checkpoints").glob("epoch=*.ckpt"))
        if len(snapshots) != 1:
            raise FileNotFoundError(f"{run_dir}/checkpoints holds {len(snapshots)} warm-up snapshots (epoch=N.ckpt), not 1")
        run_dir = snapshots[0]
    model, _ = api.load_model(run_dir, setup_data=False)
    return learned_latents(model.model, N_DRAWS, torch.Generator().manual_seed(0)).reshape(-1)


def overrides(prior: str, seed: int, budget: str) -> list[str]:
    # test=false: the table's distances come from the checkpoints (the test loop's NLL took 2 of the mixture's 22 min)
    return ["experiment=almond_normal_means", f"data.prior={prior}", f"data.data_seed={seed}", f"seed={seed}", "test=false",
            *PER_PRIOR.get(prior, []), *BUDGET[budget]]


def run(out_dir: Path, budget: str, repeats: int) -> Report:
    results: dict[str, dict[str, list[tuple[float, float]]]] = {p: {m: [] for m in ("eb", *METHODS)} for p in PRIORS}
    draws: dict[str, dict[str, torch.Tensor]] = {p: {} for p in PRIORS}
    # independent runs, one process per core: the mixture's (a 50-100-50 net, ~90% of the work) first, on every core
    # (ALMOND's blocks of chains run side by side), the small ones one thread each beside it
    cells = sorted(((p, r) for p in PRIORS for r in range(repeats)), key=lambda c: c[0] != "mixture")
    cores = os.cpu_count() or 1
    train_runs([(out_dir / p / f"almond-{r}", overrides(p, 123 + r, budget)) for p, r in cells],
               threads=[cores if p == "mixture" else 1 for p, _ in cells])
    for prior in PRIORS:
        for r in range(repeats):
            seed = 123 + r
            estimate, truth = empirical_bayes(prior, seed, torch.Generator().manual_seed(seed))
            results[prior]["eb"].append(distances(estimate, truth, prior))
            draws[prior].setdefault("truth", truth)
            draws[prior].setdefault("eb", estimate)
            for method in METHODS:
                learned = learned_prior(out_dir / prior / f"almond-{r}", method)
                results[prior][method].append(distances(learned, truth, prior))
                draws[prior].setdefault(method, learned)
    rows = []
    for prior in PRIORS:
        for which, label in ((0, "D (KS)"), (1, "W (1-Wasserstein)")):
            ours = [cell([v[which] for v in results[prior][m]]) for m in ("eb", *METHODS)]
            paper = [f"{PAPER[prior][m][which]:.3f}" for m in ("eb", *METHODS)]
            rows.append([prior, label, *ours, *paper])
    header = ["prior", "distance", "EB (ours)", "VAE (ours)", "ALMOND (ours)", "EB (paper)", "VAE (paper)",
              "ALMOND (paper)"]
    figure = plot(out_dir / "almond_normal_means.png", draws)
    return Report(markdown_table(header, rows), figure)


def plot(path: Path, draws: dict[str, dict[str, torch.Tensor]]) -> Path:
    """The three estimated priors against the truth, one panel per prior (as the official figure)."""
    from latentlab.plotting import new_figure

    fig, axes = new_figure(1, len(draws), size=(4.0, 3.2))
    for ax, (prior, d) in zip(axes, draws.items()):
        truth = d["truth"].numpy()
        bins = np.linspace(np.quantile(truth, 0.001) - 1, np.quantile(truth, 0.999) + 1, 60)
        ax.hist(truth, bins=bins, density=True, color="0.85", label="true prior")
        for key, label in (("eb", "empirical Bayes"), ("vae", "VAE"), ("almond", "ALMOND")):
            if key in d:
                hist, edges = np.histogram(d[key].numpy(), bins=bins, density=True)
                ax.plot(0.5 * (edges[1:] + edges[:-1]), hist, label=label)
        ax.set_title(prior)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


TABLE = Table("almond_normal_means", "Qiu & Wang's many normal means: KS / W1 distance of the estimated prior "
              "(empirical Bayes, VAE, ALMOND) to the true one, three priors.", run)
