"""Inference-gap decomposition (Cremer et al. 2018) on linear-Gaussian models, where the posterior
is Gaussian and every gap has a closed form: KL(q || p(z|x)) = log p(x) - ELBO[q]."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import Tensor
from torch.distributions import MultivariateNormal, kl_divergence

from latentlab.analytic import LinearGaussian
from latentlab.errors import ConfigError
from latentlab.generative import GenerativeModel
from latentlab.estimators import GapSettings, fit_local_gaussian, gaussian_elbo, gaussian_log_weights, inference_gaps

N_SE = 4.0
D, d, S2, N = 6, 2, 0.5, 16


def exact_model(lg: LinearGaussian) -> GenerativeModel:
    """float64 model with the noise log-variance in float64 (to_model() stores it in float32)."""
    model = lg.to_model().double()
    model.likelihood.log_var.fill_(math.log(lg.s2))
    return model


def make(orthogonal: bool, seed: int) -> tuple[LinearGaussian, GenerativeModel, Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, d, generator=g, dtype=torch.float64)
    if orthogonal:  # columns on disjoint rows: W^T W is exactly diagonal, so is the posterior covariance
        W = W * (torch.arange(D)[:, None] * d // D == torch.arange(d)[None, :])
    b = torch.randn(D, generator=g, dtype=torch.float64)
    # float32-representable, because to_model() builds a float32 nn.Linear before .double()
    lg = LinearGaussian(W.float().double(), b.float().double(), S2)
    x, _ = lg.sample(N, generator=g)
    return lg, exact_model(lg), x


def kl_to_posterior(lg: LinearGaussian, x: Tensor, mu: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mu, diag exp(log_var)) || p(z|x)) per example: the exact ELBO gap of that Gaussian."""
    mean, cov = lg.posterior(x)
    q = MultivariateNormal(mu, covariance_matrix=torch.diag_embed(log_var.exp()))
    return kl_divergence(q, MultivariateNormal(mean, covariance_matrix=cov.expand(x.shape[0], d, d)))


def elbo_and_se(model: GenerativeModel, x: Tensor, mu: Tensor, log_var: Tensor, k: int, seed: int) -> tuple[Tensor, float]:
    """Per-example ELBO estimate and the standard error of its mean over examples."""
    log_w = gaussian_log_weights(model.log_joint, x, mu, log_var, k, torch.Generator().manual_seed(seed))
    se = (log_w.var(0) / k).sum().sqrt() / x.shape[0]
    return log_w.mean(0), float(se)


def test_elbo_of_the_exact_posterior_is_log_px() -> None:
    lg, model, x = make(orthogonal=True, seed=0)
    mean, cov = lg.posterior(x)
    log_var = cov.diagonal().log().expand_as(mean)
    # log p(x, z) - log p(z|x) = log p(x) for every z: exact with any number of samples
    elbo = gaussian_elbo(partial(model.log_joint, x), mean, log_var, k=3, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(elbo, lg.log_marginal(x), rtol=0, atol=1e-10)


def test_elbo_matches_log_px_minus_kl() -> None:
    lg, model, x = make(orthogonal=False, seed=1)
    mean, _ = lg.posterior(x)
    mu, log_var = mean + 0.3, torch.full_like(mean, -1.0)
    elbo, se = elbo_and_se(model, x, mu, log_var, k=4000, seed=2)
    exact = lg.log_marginal(x) - kl_to_posterior(lg, x, mu, log_var)
    assert abs(float(elbo.mean() - exact.mean())) < N_SE * se
    # the chunked estimator (other random numbers, same distribution) agrees as well
    chunked = gaussian_elbo(partial(model.log_joint, x), mu, log_var, k=4000, generator=torch.Generator().manual_seed(3),
                            chunk_size=300)
    assert abs(float(chunked.mean() - exact.mean())) < N_SE * se


def test_gap_decomposition_with_a_gaussian_posterior() -> None:
    lg, model, x = make(orthogonal=True, seed=4)
    truth = lg.log_marginal(x)
    mean, cov = lg.posterior(x)
    # a deliberately wrong "encoder": shifted mean and inflated variance
    mu_a, log_var_a = mean + 0.7, cov.diagonal().log().expand_as(mean) + 1.0
    elbo_a, se_a = elbo_and_se(model, x, mu_a, log_var_a, k=4000, seed=5)
    with torch.no_grad():  # must work from an evaluation loop
        mu_l, log_var_l, elbo_l = fit_local_gaussian(
            model.log_joint, x, mu_a, log_var_a, steps=300, lr=0.05, k=8, eval_k=500,
            generator=torch.Generator().manual_seed(6),
        )
    assert all(p.grad is None for p in model.parameters())  # only q's parameters were optimised

    gaps = inference_gaps(truth, elbo_a, elbo_l)
    assert gaps["approximation_gap"] + gaps["amortization_gap"] == pytest.approx(gaps["inference_gap"], abs=1e-12)

    # the family contains the posterior, so the local optimum is it: approximation gap ~ 0 ...
    kl_local = kl_to_posterior(lg, x, mu_l, log_var_l)
    assert float(kl_local.max()) < 1e-4
    _, se_l = elbo_and_se(model, x, mu_l, log_var_l, k=500, seed=7)
    assert abs(gaps["approximation_gap"] - float(kl_local.mean())) < N_SE * se_l + 1e-12
    # ... and the whole inference gap is amortization: KL(q_amortized || posterior) in closed form
    kl_amortized = float(kl_to_posterior(lg, x, mu_a, log_var_a).mean())
    assert abs(gaps["amortization_gap"] - (kl_amortized - float(kl_local.mean()))) < N_SE * (se_a + se_l)
    assert gaps["amortization_gap"] > N_SE * se_a


def test_mean_field_approximation_gap_matches_closed_form() -> None:
    lg, model, x = make(orthogonal=False, seed=8)
    truth = lg.log_marginal(x)
    mean, cov = lg.posterior(x)
    precision = torch.linalg.inv(cov)
    # best factorised Gaussian for N(m, Lambda^-1): mean m, variances 1 / Lambda_ii, and
    # KL = 0.5 (sum_i log Lambda_ii - log det Lambda), the same for every x
    expected = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))
    assert expected > 0.01  # a correlated posterior: the family really is too small
    mu_l, log_var_l, elbo_l = fit_local_gaussian(
        model.log_joint, x, torch.zeros_like(mean), torch.zeros_like(mean), steps=400, lr=0.05, k=64, eval_k=2000,
        generator=torch.Generator().manual_seed(9),
    )
    kl_fit = kl_to_posterior(lg, x, mu_l, log_var_l)
    assert float((kl_fit - expected).max()) < 0.01 * float(expected)  # optimiser at the mean-field optimum
    _, se = elbo_and_se(model, x, mu_l, log_var_l, k=2000, seed=10)
    gaps = inference_gaps(truth, elbo_l, elbo_l)
    assert abs(gaps["approximation_gap"] - float(kl_fit.mean())) < N_SE * se
    assert gaps["amortization_gap"] == 0.0


def correlated_model(a: float = 3.864) -> tuple[LinearGaussian, GenerativeModel]:
    """A 2-d linear-Gaussian model whose posterior correlation is ~0.909 (one data dimension loads on both
    latents with weight a): mean-field gap 0.5 (sum_i log Lambda_ii - log det Lambda) = 0.8736 for every x."""
    W = torch.zeros(D, d, dtype=torch.float64)
    W[0], W[1, 0], W[2, 1] = a, 1.0, 1.0
    lg = LinearGaussian(W, torch.linspace(-1.0, 1.0, D, dtype=torch.float64), S2)
    return lg, exact_model(lg)


def test_approximation_gap_converges_from_the_prior_start() -> None:
    """Optimised to convergence (Cremer et al.): from q = N(0, I), far from posteriors 9x narrower, the local
    Gaussians reach the analytic mean-field gap 0.874 (the old fixed 500 cosine steps stopped at 1.79)."""
    lg, model = correlated_model()
    x, _ = lg.sample(N, generator=torch.Generator().manual_seed(11))
    _, cov = lg.posterior(x)
    precision = torch.linalg.inv(cov)
    expected = float(0.5 * (precision.diagonal().log().sum() - torch.logdet(precision)))
    assert expected == pytest.approx(0.874, abs=1e-3)
    zeros = torch.zeros(N, d, dtype=torch.float64)
    fit = fit_local_gaussian(model.log_joint, x, zeros, zeros, generator=torch.Generator().manual_seed(12),
                             settings=GapSettings(local_eval_k=2000))
    assert bool(fit.converged.all()) and fit.steps < GapSettings().local_steps  # stopped by the criterion
    gap = float((lg.log_marginal(x) - fit.elbo).mean())
    assert abs(gap - 0.874) < 0.02
    kl_fit = kl_to_posterior(lg, x, fit.mu, fit.log_var)  # the exact gap of the Gaussians found
    assert float((kl_fit - expected).max()) < 0.01
    # a budget too small to converge is reported as such, not passed off as a gap
    short = fit_local_gaussian(model.log_joint, x, zeros, zeros, steps=100, generator=torch.Generator().manual_seed(13))
    assert int((~short.converged).sum()) == N


def test_inference_gaps_keys_and_errors() -> None:
    log_px = torch.tensor([-10.0, -12.0], dtype=torch.float64)
    elbo = torch.tensor([-11.0, -12.5], dtype=torch.float64)
    out = inference_gaps(log_px, elbo)
    assert out["inference_gap"] == pytest.approx(0.75) and "approximation_gap" not in out
    assert out["inference_gap_se"] == pytest.approx(0.25)  # gaps (1.0, 0.5): std 0.3536 / sqrt(2)
    with pytest.raises(ConfigError, match="shape"):
        inference_gaps(log_px, elbo[:1])
