"""The model p(x, z): likelihoods against torch.distributions, KL against Monte Carlo, shapes."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Independent, Normal

from latentlab import BernoulliLikelihood, GaussianLikelihood, GenerativeModel
from latentlab.analytic import LinearGaussian
from latentlab.posterior import gaussian_kl_to_standard_normal
from latentlab.nets import NetSpec, build_decoder, build_encoder


def test_bernoulli_log_prob_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    logits = 8 * torch.randn(16, 30, generator=g)  # large logits: the stable form must not overflow
    x = torch.bernoulli(torch.full((16, 30), 0.3), generator=g)
    expected = Independent(Bernoulli(logits=logits), 1).log_prob(x)
    torch.testing.assert_close(BernoulliLikelihood().log_prob(x, logits), expected)


@pytest.mark.parametrize("learn_variance,per_sample", [(False, False), (True, False), (True, True)])
def test_gaussian_log_prob_matches_torch_distributions(learn_variance: bool, per_sample: bool) -> None:
    g = torch.Generator().manual_seed(1)
    lik = GaussianLikelihood(10, variance=0.3, learn_variance=learn_variance, per_sample=per_sample)
    params = torch.randn(5, 10 * lik.param_multiplier, generator=g)
    x = torch.randn(5, 10, generator=g)
    if per_sample:
        mu, log_var = params.chunk(2, -1)
    else:
        mu, log_var = params, torch.full_like(params, math.log(0.3))
    expected = Independent(Normal(mu, torch.exp(0.5 * log_var)), 1).log_prob(x)
    torch.testing.assert_close(lik.log_prob(x, params), expected)
    assert any(p.requires_grad for p in lik.parameters()) == (learn_variance and not per_sample)


@pytest.mark.parametrize("make, multiplier", [
    (lambda d: BernoulliLikelihood(), 1), (lambda d: GaussianLikelihood(d, 0.3), 1),
    (lambda d: GaussianLikelihood(d, learn_variance=True, per_sample=True), 2)])
def test_pairwise_log_prob_equals_log_prob_of_every_pair(make, multiplier: int) -> None:
    """The quadrature's all-pairs scoring (one matrix product) against `log_prob` pair by pair, for binary and
    grey x: equal to float32 round-off (relative 1e-6; the product runs in float64)."""
    gen = torch.Generator().manual_seed(0)
    d, lik = 40, make(40)
    params = 2 * torch.randn(30, multiplier * d, generator=gen)
    for x in (torch.rand(6, d, generator=gen), torch.bernoulli(torch.full((6, d), 0.3), generator=gen)):
        expected = torch.stack([torch.stack([lik.log_prob(xb, pg) for xb in x]) for pg in params])
        torch.testing.assert_close(lik.pairwise_log_prob(x, params), expected, rtol=1e-6, atol=1e-4)


def test_analytic_kl_matches_monte_carlo() -> None:
    g = torch.Generator().manual_seed(2)
    mu, log_var = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    q = Independent(Normal(mu, torch.exp(0.5 * log_var)), 1)
    p = Independent(Normal(torch.zeros(3), torch.ones(3)), 1)
    n = 200_000
    z = mu + torch.exp(0.5 * log_var) * torch.randn(n, 4, 3, generator=g)
    terms = q.log_prob(z) - p.log_prob(z)  # (n, 4)
    mc, se = terms.mean(0), terms.std(0) / math.sqrt(n)
    analytic = gaussian_kl_to_standard_normal(mu, log_var)
    assert torch.all((mc - analytic).abs() < 4 * se), (mc, analytic, se)
    torch.testing.assert_close(analytic, torch.distributions.kl_divergence(q, p))


def test_log_joint_broadcasts_over_sample_dims_and_matches_closed_form() -> None:
    g = torch.Generator().manual_seed(3)
    lg = LinearGaussian.random(6, 2, s2=0.4, generator=g)
    model = lg.to_model()
    x, _ = lg.sample(5, generator=g)
    z = torch.randn(7, 5, 2, generator=g)
    lj = model.log_joint(x, z)
    assert lj.shape == (7, 5)
    # log p(x, z) = log p(z | x) + log p(x): check against the exact posterior and marginal
    mean, cov = lg.posterior(x)
    log_post = torch.distributions.MultivariateNormal(mean, cov).log_prob(z)
    torch.testing.assert_close(lj, log_post + lg.log_marginal(x), rtol=1e-4, atol=1e-4)
    assert model.sample(4).shape == (4, 6)


def test_prior_rejects_impossible_latent_dim() -> None:
    with pytest.raises(ValueError, match="latent_dim"):
        GenerativeModel(torch.nn.Identity(), BernoulliLikelihood(), 0)


def test_nets_shapes_for_mlp_and_conv() -> None:
    x = torch.rand(3, 784)
    for kind in ("mlp", "conv"):
        spec = NetSpec(kind=kind, hidden_dims=[32])
        enc = build_encoder(spec, 784, 2 * 4, (1, 28, 28))
        dec = build_decoder(spec, 4, 2 * 784, (1, 28, 28))
        assert enc(x).shape == (3, 8)
        assert dec(torch.randn(3, 4)).shape == (3, 1568)


class _NoClosedForm(BernoulliLikelihood):
    def param_score(self, x: torch.Tensor, params: torch.Tensor) -> None:
        return None


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian_learned", "gaussian_per_sample", "no_closed_form"])
def test_joint_score_is_the_autograd_gradient_of_log_joint(likelihood: str) -> None:
    """In float64 the closed-form score and autograd of the log-density are the same sums up to rounding (1e-12), for
    every likelihood, per-sample log-variances below their clamp included, and the autograd fallback."""
    g = torch.Generator().manual_seed(3)
    D, d = 12, 3
    lik = {"bernoulli": BernoulliLikelihood(), "no_closed_form": _NoClosedForm(),
           "gaussian": GaussianLikelihood(D, variance=0.4),
           "gaussian_learned": GaussianLikelihood(D, variance=0.4, learn_variance=True),
           "gaussian_per_sample": GaussianLikelihood(D, learn_variance=True, per_sample=True, min_log_var=-1.0)}[likelihood]
    model = GenerativeModel(build_decoder(NetSpec(kind="mlp", hidden_dims=(16,)), d, D * lik.param_multiplier), lik, d).double()
    x = (torch.rand(5, D, generator=g, dtype=torch.float64) > 0.5).double() if "bernoulli" in likelihood or \
        likelihood == "no_closed_form" else torch.randn(5, D, generator=g, dtype=torch.float64)
    z = 2.0 * torch.randn(7, 5, d, generator=g, dtype=torch.float64)  # wide: some log-variances hit the clamp
    if likelihood == "gaussian_per_sample":
        assert bool((model.decode(z)[..., D:] < -1.0).any())
    leaf = z.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(model.log_joint(x, leaf).sum(), leaf)
    with torch.no_grad():  # as inside a sampler
        score = model.joint(x).score(z)
    torch.testing.assert_close(score, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.joint(x)(z), model.log_joint(x, z))
