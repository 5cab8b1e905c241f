"""Posterior-quality diagnostics (latentlab.metrics.posterior) through the posterior contract alone,
and the comparison table (latentlab.compare), on linear-Gaussian models where log p(x), p(z|x) and
every gap have closed forms."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.distributions import Independent, MultivariateNormal, kl_divergence

from latentlab.analytic import LinearGaussian
from latentlab.compare import comparison_table, find_runs, write_comparison
from latentlab.compare import main as compare_main
from latentlab.errors import ConfigError
from latentlab.estimators import (AnnealedImportanceSampling, GapSettings, NLLSettings, ais_start, estimate_log_px,
                                  gaussian_elbo, gaussian_log_weights, inference_gaps, moment_fit)
from latentlab.generative import GenerativeModel
from latentlab.metrics.posterior import (
    InferenceGap,
    bdmc_metrics,
    inference_gap_metrics,
    plot_posterior_pictures,
    posterior_pictures,
    zoomed_posteriors,
)
from latentlab.posterior import GaussianPosterior, Posterior, SamplePosterior

N_SE = 4.0
D, S2 = 6, 0.5


def linear_gaussian(d: int, orthogonal: bool, seed: int) -> LinearGaussian:
    """float32-representable parameters (to_model() builds a float32 layer first), used in float64."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, d, generator=g, dtype=torch.float64)
    if orthogonal:  # columns on disjoint rows: a diagonal posterior covariance, inside the Gaussian family
        W = W * (torch.arange(D)[:, None] * d // D == torch.arange(d)[None, :])
    b = torch.randn(D, generator=g, dtype=torch.float64)
    return LinearGaussian(W.float().double(), b.float().double(), S2)


def kl_to_posterior(lg: LinearGaussian, x: Tensor, mu: Tensor, log_var: Tensor) -> Tensor:
    mean, cov = lg.posterior(x)
    q = MultivariateNormal(mu, covariance_matrix=torch.diag_embed(log_var.exp()))
    return kl_divergence(q, MultivariateNormal(mean, covariance_matrix=cov.expand(x.shape[0], *cov.shape)))


class LinearGaussianPosterior(Posterior):
    """The contract around an exact linear-Gaussian p(z|x): its AIS start (`fitted_gaussian`) is the exact
    (diagonal) posterior, so AIS started there is exact; its amortized Gaussian is deliberately wrong by
    `shift` / `log_var_offset`, and its bound is that Gaussian's ELBO. Draws come from the exact posterior."""

    has_density = False

    def __init__(self, method: "LinearGaussianMethod", x: Tensor) -> None:
        self.x = x
        mean, cov = method.lg.posterior(x)
        self.exact = (mean, cov.diagonal().log().expand_as(mean))
        self.wrong = (mean + method.shift, self.exact[1] + method.log_var_offset)
        self.log_joint = partial(method.model.log_joint, x)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return GaussianPosterior(*self.exact).sample(n, generator)

    def gaussian(self) -> tuple[Tensor, Tensor] | None:
        return self.wrong

    def fitted_gaussian(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return self.exact

    def bound(self, k: int, generator: torch.Generator | None = None) -> Tensor | None:
        return gaussian_elbo(self.log_joint, *self.wrong, k, generator)


class LinearGaussianMethod:
    """A 'method' around an exact linear-Gaussian p(x, z): all the evaluator needs is `model` and `posterior`."""

    method = "lg"

    def __init__(self, lg: LinearGaussian, shift: float = 0.7, log_var_offset: float = 1.0) -> None:
        self.lg, self.shift, self.log_var_offset = lg, shift, log_var_offset
        model = lg.to_model().double()
        model.likelihood.log_var.fill_(math.log(lg.s2))
        self.model: GenerativeModel = model

    def posterior(self, x: Tensor, index: Tensor | None = None) -> Posterior:
        return LinearGaussianPosterior(self, x)

    def amortized_gaussian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.posterior(x).gaussian()  # type: ignore[return-value]


AIS3 = replace(NLLSettings.preset("fast"), estimator="ais", ais_steps=3, ais_start="posterior")


def elbo_se(module: LinearGaussianMethod, x: Tensor, k: int, seed: int) -> float:
    """Standard error of the mean over examples of a k-sample ELBO estimate of the amortized Gaussian."""
    mu, log_var = module.amortized_gaussian(x)
    log_w = gaussian_log_weights(module.model.log_joint, x, mu, log_var, k, torch.Generator().manual_seed(seed))
    return float((log_w.var(0) / k).sum().sqrt() / x.shape[0])


# --------------------------------------------------------------------------- inference gap


def test_inference_gap_pipeline_matches_the_closed_form_kl() -> None:
    lg = linear_gaussian(2, orthogonal=True, seed=0)
    module = LinearGaussianMethod(lg)
    x, _ = lg.sample(24, generator=torch.Generator().manual_seed(1))
    # AIS started at the exact posterior has constant weights: log p(x) to rounding, whatever the steps
    log_px = estimate_log_px(module.model, x, module.posterior(x), AIS3, torch.Generator().manual_seed(2)).log_px
    assert torch.allclose(log_px, lg.log_marginal(x), rtol=0, atol=1e-8)

    # max_elements: the bound is asked for 7 examples at a time (2000 x 7 x 6 elements), across batch ends
    settings = GapSettings(elbo_k=2000, local_steps=300, local_lr=0.05, local_k=8, local_eval_k=500, max_elements=2000 * 7 * D)
    batches = [(x[:10], torch.arange(10)), (x[10:], torch.arange(10, 24))]  # the metric accumulates batches
    gaps = inference_gap_metrics(module, batches, settings, AIS3, torch.Generator().manual_seed(3))
    assert gaps is not None
    assert gaps["gap_local_not_converged"] == 0.0
    kl_amortized = float(kl_to_posterior(lg, x, *module.amortized_gaussian(x)).mean())
    se = elbo_se(module, x, settings.elbo_k, seed=4)
    # log p(x) - ELBO[q] = KL(q || p(z|x)) per example
    assert abs(gaps["inference_gap"] - kl_amortized) < N_SE * se
    assert gaps["approximation_gap"] + gaps["amortization_gap"] == pytest.approx(gaps["inference_gap"], abs=1e-10)
    # the posterior is a diagonal Gaussian, so the per-example optimum reaches it: no approximation gap (the
    # optimiser's residual KL is < 1e-4 at these settings, tests/test_gaps.py), all of it is amortization
    assert abs(gaps["approximation_gap"]) < 1e-3
    assert abs(gaps["amortization_gap"] - kl_amortized) < N_SE * se + 1e-3
    assert gaps["gap_log_px"] == pytest.approx(float(lg.log_marginal(x).mean()), abs=1e-8)


def test_methods_without_a_bound_or_an_amortized_gaussian() -> None:
    lg = linear_gaussian(2, orthogonal=True, seed=5)
    x, _ = lg.sample(4, generator=torch.Generator().manual_seed(6))

    class NoBoundPosterior(LinearGaussianPosterior):
        def gaussian(self) -> None:
            return None

        def bound(self, k: int, generator: torch.Generator | None = None) -> None:
            return None

    class NoBound(LinearGaussianMethod):
        def posterior(self, x: Tensor, index: Tensor | None = None) -> Posterior:
            return NoBoundPosterior(self, x)

    assert inference_gap_metrics(NoBound(lg), [(x, torch.arange(4))], nll=AIS3) is None

    class OwnBoundPosterior(NoBoundPosterior):  # a bound of its own but no amortized Gaussian (ALMOND-like): no split
        def bound(self, k: int, generator: torch.Generator | None = None) -> Tensor:
            return lg.log_marginal(self.x) - 1.0

    class OwnBound(LinearGaussianMethod):
        def posterior(self, x: Tensor, index: Tensor | None = None) -> Posterior:
            return OwnBoundPosterior(self, x)

    gaps = inference_gap_metrics(OwnBound(lg), [(x, torch.arange(4))], nll=AIS3)
    assert gaps is not None and "approximation_gap" not in gaps
    assert gaps["inference_gap"] == pytest.approx(1.0, abs=1e-8)


def test_fitted_gaussian_elbo_of_exact_posterior_draws() -> None:
    """ALMOND's bound: the Gaussian moment-matched to posterior samples. With exact samples of a correlated
    posterior the fit is N(m, diag Sigma), whose gap KL(N(m, diag Sigma) || N(m, Sigma)) is closed form."""
    lg = linear_gaussian(2, orthogonal=False, seed=7)
    model = LinearGaussianMethod(lg).model
    x, _ = lg.sample(8, generator=torch.Generator().manual_seed(8))
    mean, cov = lg.posterior(x)
    n, k = 20000, 4000
    draws = MultivariateNormal(mean, covariance_matrix=cov).sample((n,))
    sampled = SamplePosterior(lambda m, g: draws[:m], partial(model.log_joint, x), fit_draws=n)
    elbo = sampled.bound(k, generator=torch.Generator().manual_seed(9))
    mu_f, log_var_f = moment_fit(draws)
    kl_fit = kl_to_posterior(lg, x, mu_f, log_var_f)
    log_w = gaussian_log_weights(model.log_joint, x, mu_f, log_var_f, k, torch.Generator().manual_seed(10))
    se = float((log_w.var(0) / k).sum().sqrt() / x.shape[0])
    # log p(x) - ELBO = KL(fitted Gaussian || posterior), up to the ELBO's Monte Carlo error
    assert abs(float((lg.log_marginal(x) - elbo).mean() - kl_fit.mean())) < N_SE * se
    # and the fit is the moment-matched N(m, diag Sigma): KL = 0.5 (tr(Lambda diag Sigma) - d + log det Sigma
    # - sum log Sigma_ii), Lambda = Sigma^-1. Variances estimated from n draws have relative sd sqrt(2 / n), and
    # dKL / d log s2_i = 0.5 (Lambda_ii Sigma_ii - 1): that first-order term sets the tolerance (means: O(1/n))
    precision = torch.linalg.inv(cov)
    expected = 0.5 * (torch.trace(precision @ torch.diag(cov.diagonal())) - 2 + torch.logdet(cov) - cov.diagonal().log().sum())
    assert expected > 0.01  # correlated: a diagonal Gaussian really is too small
    fit_sd = 0.5 * float(((precision.diagonal() * cov.diagonal() - 1) ** 2).sum().sqrt()) * math.sqrt(2 / n)
    assert float((kl_fit - expected).abs().max()) < N_SE * fit_sd + 2 / n


def test_almond_hooks_summarise_its_langevin_draws() -> None:
    """ALMOND's evaluator hooks on an exact linear-Gaussian p(x, z): MALA chains (exact invariant law) give
    draws of p(z|x), and its bound is the moment-matched Gaussian's ELBO, whose gap is known in closed form."""
    from latentlab.models import ALMOND

    lg = linear_gaussian(2, orthogonal=False, seed=7)
    n, k = 2000, 2000
    almond = ALMOND(data_dim=D, latent_dim=2, likelihood="gaussian", sampler="mala", eval_chains=n, eval_langevin_steps=200)
    almond.model = LinearGaussianMethod(lg).model
    x, _ = lg.sample(8, generator=torch.Generator().manual_seed(30))
    mean, cov = lg.posterior(x)
    posterior = almond.posterior(x, None)  # no persistent chains for these x: fresh Langevin chains
    draws = posterior.sample(n, torch.Generator().manual_seed(31))
    assert draws.shape == (n, 8, 2)
    assert ((draws.mean(0) - mean).abs() < N_SE * (cov.diagonal() / n).sqrt()).all()
    gap = lg.log_marginal(x) - posterior.bound(k, generator=torch.Generator().manual_seed(32))
    precision = torch.linalg.inv(cov)
    expected = 0.5 * (torch.trace(precision @ torch.diag(cov.diagonal())) - 2 + torch.logdet(cov) - cov.diagonal().log().sum())
    # per example, the fitted variances' relative sd sqrt(2 / n) moves the KL by 0.5 (Lambda_ii Sigma_ii - 1) each
    # (see the test above), independently across the 8 examples; plus the ELBO's own Monte Carlo error
    fit_sd = 0.5 * float(((precision.diagonal() * cov.diagonal() - 1) ** 2).sum().sqrt()) * math.sqrt(2 / n)
    log_w = gaussian_log_weights(almond.model.log_joint, x, mean, cov.diagonal().log().expand_as(mean), k,
                                 torch.Generator().manual_seed(33))
    mc_se = float((log_w.var(0) / k).sum().sqrt() / x.shape[0])
    assert abs(float(gap.mean() - expected)) < N_SE * math.hypot(fit_sd / math.sqrt(8), mc_se) + 2 / n
    assert posterior.gaussian() is None  # no amortized Gaussian: the gap is reported without a split


def test_inference_gap_metric_state_and_errors() -> None:
    g = torch.Generator().manual_seed(10)
    log_px, elbo, local = (torch.randn(12, generator=g, dtype=torch.float64) for _ in range(3))
    metric = InferenceGap()
    metric.update(log_px[:5], elbo[:5], local[:5])
    metric.update(log_px[5:], elbo[5:], local[5:])
    out = metric.compute()
    ref = inference_gaps(log_px, elbo, local)
    assert out["inference_gap"] == pytest.approx(ref["inference_gap"])
    assert out["amortization_gap_se"] == pytest.approx(ref["amortization_gap_se"])
    assert out["gap_elbo"] == pytest.approx(ref["elbo_amortized"])
    half = InferenceGap()
    half.update(log_px[:5], elbo[:5], local[:5])
    half.update(log_px[5:], elbo[5:])
    with pytest.raises(ConfigError, match="some batches"):
        half.compute()
    with pytest.raises(ConfigError):
        GapSettings(elbo_k=0)


# --------------------------------------------------------------------------- BDMC


def test_bdmc_sandwiches_the_exact_expected_log_likelihood() -> None:
    """On data simulated from the model, E[log p(x)] = -H[p(x)] = -0.5 log det(2 pi e C); AIS from the prior
    bounds it from below, reverse AIS from the exact posterior sample from above, and more steps narrow the gap."""
    lg = linear_gaussian(2, orthogonal=False, seed=11)
    module = LinearGaussianMethod(lg)
    prior_start = replace(AIS3, ais_start="prior")
    cov = lg.marginal().covariance_matrix
    truth = -0.5 * float(torch.logdet(2 * math.pi * math.e * cov))
    ais = AnnealedImportanceSampling(n_steps=60, n_chains=1, leapfrog_steps=3)
    out = bdmc_metrics(module, 40, ais, batch_size=16, generator=torch.Generator().manual_seed(12), nll=prior_start)
    assert out["bdmc_lower"] - N_SE * out["bdmc_lower_se"] < truth < out["bdmc_upper"] + N_SE * out["bdmc_upper_se"]
    assert out["bdmc_gap"] > -N_SE * out["bdmc_gap_se"]
    # started at the exact posterior (the posterior's fitted Gaussian, ais_start=posterior) both directions are exact
    # (an orthogonal W, so that the proposal's diagonal Gaussian is the posterior)
    lg_diag = linear_gaussian(2, orthogonal=True, seed=11)
    exact = bdmc_metrics(LinearGaussianMethod(lg_diag), 40, ais, batch_size=16, generator=torch.Generator().manual_seed(13),
                         nll=AIS3)
    assert abs(exact["bdmc_gap"]) < 1e-8 and exact["bdmc_gap_se"] < 1e-8
    truth_diag = -0.5 * float(torch.logdet(2 * math.pi * math.e * lg_diag.marginal().covariance_matrix))
    assert abs(exact["bdmc_lower"] - truth_diag) < N_SE * exact["bdmc_lower_se"]
    crude = bdmc_metrics(module, 40, AnnealedImportanceSampling(n_steps=2, n_chains=1, leapfrog_steps=3), batch_size=40,
                         generator=torch.Generator().manual_seed(12), nll=prior_start)
    assert crude["bdmc_gap"] - out["bdmc_gap"] > N_SE * math.hypot(crude["bdmc_gap_se"], out["bdmc_gap_se"])


# --------------------------------------------------------------------------- 2-d pictures


def test_zoomed_grid_posterior_has_the_exact_moments(tmp_path: Path) -> None:
    lg = linear_gaussian(2, orthogonal=False, seed=13)
    module = LinearGaussianMethod(lg)
    x, _ = lg.sample(3, generator=torch.Generator().manual_seed(14))
    mean, cov = lg.posterior(x)
    resolution = 121
    for i, (probs, (x0, x1, y0, y1)) in enumerate(zoomed_posteriors(module.model, x, resolution=resolution)):
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-9)
        hx, hy = (x1 - x0) / resolution, (y1 - y0) / resolution
        cx = x0 + hx * (torch.arange(resolution, dtype=torch.float64) + 0.5)
        cy = y0 + hy * (torch.arange(resolution, dtype=torch.float64) + 0.5)
        px, py = probs.sum(0), probs.sum(1)  # marginals over x (columns) and y (rows)
        m = torch.stack([(px * cx).sum(), (py * cy).sum()])
        var = torch.stack([(px * (cx - m[0]) ** 2).sum(), (py * (cy - m[1]) ** 2).sum()])
        # midpoint rule on a +/- 4 sd window: mean exact up to the truncated tails (~1e-4 sd); the discretised
        # variance exceeds the true one by Sheppard's h^2 / 12, and the tails beyond 4 sd hold ~0.3% of it
        assert torch.allclose(m, mean[i], atol=1e-3 * float(cov.diagonal().sqrt().max()))
        sheppard = torch.tensor([hx**2, hy**2], dtype=torch.float64) / 12
        assert torch.allclose(var, cov.diagonal() + sheppard, rtol=5e-3)
    pictures = posterior_pictures(module, x, None, n_draws=50, resolution=41, generator=torch.Generator().manual_seed(15))
    assert pictures[0].draws is not None and pictures[0].draws.shape == (50, 2)
    path = plot_posterior_pictures(tmp_path / "posteriors.png", pictures, x, image_shape=None)
    assert path.is_file() and path.stat().st_size > 1000
    with pytest.raises(ConfigError, match="2-d latent"):
        posterior_pictures(LinearGaussianMethod(linear_gaussian(3, True, 16)), x, None)


# --------------------------------------------------------------------------- base and VAE hooks


def test_vae_posterior_agrees_with_itself() -> None:
    from latentlab.models import VAE

    torch.manual_seed(17)
    vae = VAE(data_dim=D, latent_dim=2, likelihood="gaussian").double()
    x = torch.randn(5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(18))
    posterior = vae.posterior(x)
    mu, log_var = posterior.gaussian()
    assert torch.equal(mu, vae.encoder(x)[0])
    draws = posterior.sample(4000, torch.Generator().manual_seed(19))
    assert draws.shape == (4000, 5, 2)
    # draws come from q(z|x): their mean is mu within 4 standard errors sd / sqrt(n)
    assert ((draws.mean(0) - mu).abs() < N_SE * (0.5 * log_var).exp() / math.sqrt(4000)).all()
    # exact-KL ELBO and the sampled-log-q ELBO of the same Gaussian estimate the same number
    k = 4000
    exact_kl = posterior.bound(k, generator=torch.Generator().manual_seed(20))
    sampled = gaussian_elbo(partial(vae.model.log_joint, x), mu, log_var, k=k, generator=torch.Generator().manual_seed(21))
    z = mu + (0.5 * log_var).exp() * torch.randn(k, *mu.shape, dtype=mu.dtype, generator=torch.Generator().manual_seed(22))
    se_recon = float((vae.model.log_likelihood(x, z).var(0) / k).sum().sqrt() / x.shape[0])
    log_w = gaussian_log_weights(vae.model.log_joint, x, mu, log_var, k, torch.Generator().manual_seed(23))
    se = math.hypot(se_recon, float((log_w.var(0) / k).sum().sqrt() / x.shape[0]))
    assert abs(float((exact_kl - sampled).mean())) < N_SE * se
    # AIS starts: the prior on request, else the Gaussian itself (no fit needed for an amortized Gaussian)
    prior = ais_start(vae.model, x, posterior, replace(AIS3, ais_start="prior"))
    assert torch.equal(prior.mean, torch.zeros_like(mu))
    own = ais_start(vae.model, x, posterior, AIS3)
    assert isinstance(own, Independent) and torch.allclose(own.mean, mu)
    with pytest.raises(ConfigError, match="ais_start"):
        replace(AIS3, ais_start="encoder")


# --------------------------------------------------------------------------- comparison table


def test_comparison_table_over_a_sweep(tmp_path: Path) -> None:
    runs = {"0": {"test/nll": 90.0, "test/nll_se": 0.5, "method": "vae", "ckpt_path": "/a/b/c/d.ckpt"},
            "1": {"test/nll": 85.0, "test/nll_se": 0.4, "test/fid": 3.0, "method": "almond", "ckpt_path": "e.ckpt"},
            "10": {"test/nll": 88.0, "method": "avb"}}
    for name, metrics in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
    files = find_runs([tmp_path])
    assert [f.parent.name for f in files] == ["0", "1", "10"]  # job 10 after job 1, not between 1 and 2
    md, js = write_comparison(tmp_path, files, root=tmp_path)
    table = md.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].split(" | ")[:4] == ["| run", "method", "ckpt_path", "test/nll"]
    assert rows[1].startswith("| 0 | vae | b/c/d.ckpt | 90.0000 ± 0.5000 |")
    assert "**85.0000 ± 0.4000**" in rows[2]  # the lowest NLL is marked
    assert rows[3].startswith("| 10 | avb |")
    assert set(json.loads(js.read_text())) == {"0", "1", "10"}
    assert "test/fid" in comparison_table({"x": runs["1"]}) and "**" not in comparison_table({"x": runs["1"]})
    with pytest.raises(SystemExit) as exc:
        compare_main([str(tmp_path / "missing")])
    assert exc.value.code == 2
