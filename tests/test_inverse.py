"""Inverse problems against closed forms: inpainting a linear-Gaussian model, and score-based inpainting of a
correlated Gaussian, both must reproduce the analytic conditional mean and covariance."""

from __future__ import annotations

import pytest
import torch

from latentlab.analytic import LinearGaussian
from latentlab.errors import ConfigError
from latentlab.generative import GenerativeModel
from latentlab.inverse import hidden_pixel_metrics, latent_completions, make_mask, masked_log_likelihood, score_measurement
from latentlab.likelihoods import BernoulliLikelihood
from latentlab.samplers import MALA
from latentlab.samplers.score import ScoreULA

N = 4000  # chains for one example: the standard error of a mean is sqrt(var / N) ~ 0.01 here


def conditional(cov: torch.Tensor, mean: torch.Tensor, observed: torch.Tensor, y_o: torch.Tensor,
                noise_var: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of x_hidden | x_observed + N(0, noise_var) = y_o for x ~ N(mean, cov)."""
    o, h = observed, ~observed
    gain = cov[h][:, o] @ torch.linalg.inv(cov[o][:, o] + noise_var * torch.eye(int(o.sum()), dtype=cov.dtype))
    return mean[h] + gain @ (y_o - mean[o]), cov[h][:, h] - gain @ cov[o][:, h]


def test_linear_gaussian_inpainting_matches_the_analytic_conditional() -> None:
    """Langevin (MALA, exact target) on z with the observed pixels' likelihood, then x ~ p(x | z): the
    completions' hidden pixels are N(analytic conditional); decoder means alone miss exactly s2 I."""
    g = torch.Generator().manual_seed(0)
    lg = LinearGaussian.random(6, 2, 0.3, generator=g)
    lg = LinearGaussian(lg.W.double(), lg.b.double(), 0.3)
    model = lg.to_model()
    x, _ = lg.sample(1, g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]], dtype=torch.float64)
    observed = mask[0].bool()
    cov = lg.W @ lg.W.T + lg.s2 * torch.eye(6, dtype=torch.float64)
    mean, ccov = conditional(cov, lg.b, observed, x[0, observed])
    sampler = MALA(step_size=0.1, n_steps=200)
    log_obs = masked_log_likelihood(model, x, mask)
    drawn = latent_completions(model, x, mask, log_obs, sampler, N, g, completion="sample")
    assert torch.equal(drawn[:, 0, observed], x[0, observed].expand(N, -1))  # observed pixels kept
    hidden = drawn[:, 0, ~observed]
    se = (ccov.diagonal() / N).sqrt()
    assert ((hidden.mean(0) - mean).abs() < 4 * se).all(), (hidden.mean(0), mean)
    assert torch.allclose(torch.cov(hidden.T), ccov, atol=0.04)
    means = latent_completions(model, x, mask, log_obs, sampler, N, g, completion="mean")[:, 0, ~observed]
    assert torch.allclose(torch.cov(means.T), ccov - lg.s2 * torch.eye(3, dtype=torch.float64), atol=0.04)


def test_masked_likelihood_has_the_gradient_of_the_observed_pixels_only() -> None:
    torch.manual_seed(0)
    model = GenerativeModel(torch.nn.Linear(3, 8), BernoulliLikelihood(), 3).double()
    y = torch.rand(5, 8, dtype=torch.float64)
    mask = (torch.rand(5, 8) < 0.5).double()
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    (got,) = torch.autograd.grad(masked_log_likelihood(model, y, mask)(z).sum(), z)
    logits = model.decode(z)
    explicit = -(torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * mask).sum()
    (want,) = torch.autograd.grad(explicit, z)
    assert torch.allclose(got, want, atol=1e-12)


def test_score_based_inpainting_of_a_gaussian_matches_its_conditional() -> None:
    """Langevin with the exact noised score of N(0, C) plus the measurement term M (y - x) / (s_y^2 + sigma^2)
    targets p_sigma(x) N(y; M x, s_y^2 + sigma^2), checked in closed form. One level, run long: the hidden
    directions are ~70x less stiff than the observed ones, so annealing's K steps per level do not mix them
    at the last level (measured: means off by 0.05-0.08 with 8 x 100 steps); ULA's bias leaves the mean exact."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    cov = a @ a.T / 4 + 0.2 * torch.eye(4, dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)

    def score(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return -x @ torch.linalg.inv(cov + sigma**2 * eye)

    mask = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64).expand(N, 4)
    y = torch.tensor([0.8, 0.0, -0.5, 0.0], dtype=torch.float64).expand(N, 4)
    obs_noise = 0.1
    sampler = ScoreULA(step_size=2e-3, n_steps=1500, sigma=0.02)
    x = sampler.sample(score, 2.0 * torch.randn(N, 4, generator=g, dtype=torch.float64), g,
                       measurement=score_measurement(y, mask, obs_noise)).z
    observed = mask[0].bool()
    mean, ccov = conditional(cov + 0.02**2 * eye, torch.zeros(4, dtype=torch.float64), observed, y[0, observed],
                             noise_var=obs_noise**2 + 0.02**2)
    hidden = x[:, ~observed]
    assert ((hidden.mean(0) - mean).abs() < 4 * (ccov.diagonal() / N).sqrt()).all(), (hidden.mean(0), mean)
    assert torch.allclose(torch.cov(hidden.T), ccov, atol=0.03)


def test_masks_and_metrics() -> None:
    bottom = make_mask("bottom_half", 2, 64, (1, 8, 8)).reshape(2, 8, 8)
    assert bottom[:, :4].eq(1).all() and bottom[:, 4:].eq(0).all()
    left = make_mask("left_half", 1, 64, (1, 8, 8)).reshape(8, 8)
    assert left[:, :4].eq(0).all() and left[:, 4:].eq(1).all()
    rand = make_mask("random", 100, 64, None, torch.Generator().manual_seed(0))
    assert abs(float(rand.mean()) - 0.5) < 0.02
    with pytest.raises(ConfigError, match="bottom_half|left_half|random"):
        make_mask("top_half", 1, 64, (1, 8, 8))
    with pytest.raises(ConfigError, match="mask=random"):
        make_mask("left_half", 1, 2, None)
    target, mask = torch.zeros(2, 4), torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 2)
    m = hidden_pixel_metrics(torch.tensor([[9.0, 9.0, 0.1, 0.1]] * 2), target, mask)
    assert m["mse"] == pytest.approx(0.01) and m["psnr"] == pytest.approx(20.0)


def test_red_with_a_gaussian_mmse_denoiser_is_the_gaussian_map() -> None:
    """For x ~ N(0, C) the MMSE denoiser D(x, sigma) = C (C + sigma^2 I)^-1 x meets RED's conditions, and RED's
    fixed point is the MAP (= mean) of x given y under the prior N(0, C + sigma^2 I), in closed form."""
    from latentlab.inverse import red_map

    g = torch.Generator().manual_seed(2)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    cov = a @ a.T / 5 + 0.2 * torch.eye(5, dtype=torch.float64)
    sigma, obs_noise = 0.3, 0.1
    shrink = cov @ torch.linalg.inv(cov + sigma**2 * torch.eye(5, dtype=torch.float64))
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[0.5, 0.0, -1.0, 0.3, 0.0]], dtype=torch.float64)
    x = red_map(lambda v, s: v @ shrink.T, y, mask, sigma, obs_noise, n_steps=3000)
    observed = mask[0].bool()
    mean, _ = conditional(cov + sigma**2 * torch.eye(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64),
                          observed, y[0, observed], noise_var=obs_noise**2)
    assert torch.allclose(x[0, ~observed], mean, atol=1e-6)
