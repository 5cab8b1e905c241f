"""AVB under the posterior contract, and adaptive contrast with the concat encoder.

With a linear concat encoder z = W [x, eps] + b, q(z|x) is exactly Gaussian, so what adaptive contrast
shows the discriminator, z~ = (z - mu) / sigma, has a known law: with the moments taken from M draws
independent of z, each coordinate is sqrt(1 + 1/M) t_{M-1} (N(0, 1) as M grows; KL to N(0, 1) of 1.9e-4
nats at M = 128, 3e-6 at M = 1000). With the moments of the same s draws it was a studentised residual
(exactly +/-0.707 for s = 2; a spurious KL of 0.66, 0.20, 0.09 nats per dimension for s = 3, 4, 5).
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from latentlab.models import AVB
from latentlab.posterior import Posterior, gaussian_kl_to_standard_normal

M = 1000  # moment draws per x in the tests below


def linear_avb(num_samples: int = 1, adaptive_contrast: bool = True, **kw: object) -> AVB:
    """AVB whose encoder is z = W_x x + diag(0.5, 2) eps + b: q(z|x) = N(W_x x + b, diag(0.25, 4)) exactly."""
    torch.manual_seed(0)
    model = AVB(data_dim=4, latent_dim=2, net={"hidden_dims": []}, adaptive_contrast=adaptive_contrast,
                num_samples=num_samples, encoder={"kind": "concat", "noise_dim": 2, "min_moment_draws": M}, **kw)
    with torch.no_grad():
        model.encoder.net[0].weight[:, 4:] = torch.diag(torch.tensor([0.5, 2.0]))
    return model


@pytest.mark.parametrize("draws", [2, 3, 4, 5])
def test_concat_adaptive_contrast_shows_t_standard_normal_for_a_gaussian_q(draws: int) -> None:
    """For 4000 x's, z~ from `draws` draws per x. One draw per x (independent across x) must have mean 0
    (4 SE), variance 1 (4 SE of a Gaussian sample variance, plus the t-law's own excess
    (1 + 1/M)(M - 1)/(M - 3) - 1 = 0.003) and pass a KS test against N(0, 1) at 1e-3. The mean of an
    x's draws must have variance 1/draws (+1/M); the studentised residuals of the old code sum to 0."""
    model = linear_avb(draws)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 4, generator=g)
    with torch.no_grad():
        z_tilde, _ = model.contrast(model.draw(x, draws, generator=g))
    n = x.shape[0]
    excess = (1 + 1 / M) * (M - 1) / (M - 3) - 1
    var_tol = 4 * math.sqrt(2 / (n - 1))
    for j in range(2):
        col = z_tilde[0, :, j].double()
        assert abs(float(col.mean())) < 4 / math.sqrt(n), (draws, j, float(col.mean()))
        assert abs(float(col.var()) - 1) < var_tol + excess, (draws, j, float(col.var()))
        assert stats.kstest(col.numpy(), "norm").pvalue > 1e-3, (draws, j)
        per_x = z_tilde[:, :, j].double().mean(0)
        expected = (1 / draws + 1 / M) * (1 + excess)
        assert abs(float(per_x.var()) - expected) < var_tol * expected, (draws, j, float(per_x.var()))


def test_adaptive_contrast_kl_is_the_closed_form_part_when_q_is_gaussian() -> None:
    """With T = 0 (optimal for an exactly Gaussian, diagonal q under AC: q~ = N(0, I)), AVB's KL estimate is
    E_q[log r - log p] = KL(q || p) - KL(q || r). Its Monte Carlo error is 4 SE over 20000 draws; r's moments
    from M draws give, to second order, KL(q || r) ~ chi2_4 / (2M) over the two dimensions, under 12/M
    with probability 0.9999 (and never negative)."""
    model = linear_avb(discriminator={"kind": "mlp", "hidden_dims": [8], "prior_term": False})
    with torch.no_grad():
        model.discriminator.net[-1].weight.zero_()
        model.discriminator.net[-1].bias.zero_()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    mean = x @ model.encoder.net[0].weight[:, :4].T + model.encoder.net[0].bias
    kl_true = gaussian_kl_to_standard_normal(mean, torch.tensor([0.25, 4.0]).log().expand(3, 2)).detach()
    k = 20000
    with torch.no_grad():
        draw = model.draw(x, k, generator=torch.Generator().manual_seed(3))
        per_draw = model.discriminator(x, model.contrast(draw)[0]) + model.contrast(draw)[1]
    estimate, se = per_draw.mean(0), per_draw.std(0) / math.sqrt(k)
    assert (estimate < kl_true + 4 * se).all() and (estimate > kl_true - 12 / M - 4 * se).all(), (estimate, kl_true)


def test_avb_answers_an_implicit_posterior_whose_bound_is_its_discriminator_elbo() -> None:
    """No density, no amortized Gaussian; draws come from the encoder with the caller's generator; the
    bound over k draws (taken `bound_chunk` at a time) is mean_i [log p(x | z_i) - T(x, z_i)] on those draws."""
    torch.manual_seed(0)
    model = AVB(data_dim=4, latent_dim=2, net={"hidden_dims": [8]}, discriminator={"hidden_dims": [8]},
                encoder={"noise_dim": 3}, bound_chunk=7)
    x = torch.eye(4)
    q = model.posterior(x)
    assert isinstance(q, Posterior) and not q.has_density and q.gaussian() is None
    z = q.sample(5, torch.Generator().manual_seed(0))
    assert z.shape == (5, 4, 2)
    torch.testing.assert_close(z, q.sample(5, torch.Generator().manual_seed(0)), rtol=0, atol=0)
    with pytest.raises(NotImplementedError):
        q.log_prob(z)
    bound = q.bound(20, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        z_all = torch.cat([model.encoder(x, n, g, moments=False).z for n in (7, 7, 6)])
        expected = (model.model.log_likelihood(x, z_all) - model.discriminator(x, z_all)).mean(0)
    assert bound.shape == (4,) and not bound.requires_grad
    torch.testing.assert_close(bound, expected, rtol=1e-5, atol=1e-5)
    mean, log_var = q.fitted_gaussian(64, torch.Generator().manual_seed(4))
    assert mean.shape == log_var.shape == (4, 2)
