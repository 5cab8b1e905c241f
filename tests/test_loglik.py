"""log p(x) estimators (IS, AIS, BDMC), HMC and the NLL metric against the linear-Gaussian model,
whose marginal and posterior are known in closed form. Tolerances are k standard errors of the
Monte Carlo estimate in question (fixed seeds), or float64 round-off where the answer is exact."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor
from torch.distributions import Distribution, Independent, Laplace, MultivariateNormal, Normal, kl_divergence

from latentlab.analytic import LinearGaussian
from latentlab.errors import ConfigError, NumericalError
from latentlab.generative import GenerativeModel
from latentlab.estimators import (
    AnnealedImportanceSampling,
    NLLSettings,
    annealing_schedule,
    bdmc,
    importance_sampling,
    log_mean_exp,
    moment_fit,
    standard_normal,
)
from latentlab.estimators import sample_distribution as sample_proposal
from latentlab.metrics import LogLikelihood
from latentlab.posterior import GaussianPosterior, ImplicitPosterior, Posterior
from latentlab.samplers.hmc import HMC

N_SE = 4.0  # a correct estimator fails a 4-standard-error check with probability ~6e-5
D, d, S2, N = 6, 2, 0.5, 32


def exact_model(lg: LinearGaussian) -> GenerativeModel:
    """`lg` as a float64 GenerativeModel; the noise log-variance is reset in float64 because
    `to_model()` stores it in float32, which would cap agreement with the closed form at ~1e-8."""
    model = lg.to_model().double()
    model.likelihood.log_var.fill_(math.log(lg.s2))
    return model


@pytest.fixture(scope="module")
def setup() -> tuple[LinearGaussian, GenerativeModel, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    lg32 = LinearGaussian.random(D, d, S2, generator=g)
    lg = LinearGaussian(lg32.W.double(), lg32.b.double(), S2)
    x, _ = lg.sample(N, generator=g)
    return lg, exact_model(lg), x, lg.log_marginal(x)


def posterior(lg: LinearGaussian, x: Tensor) -> MultivariateNormal:
    mean, cov = lg.posterior(x)
    return MultivariateNormal(mean, covariance_matrix=cov.expand(x.shape[0], d, d))


class DistributionPosterior(Posterior):
    """Any torch Distribution with batch_shape (batch,) as a posterior with a density (the tests' proposals)."""

    has_density = True

    def __init__(self, dist: Distribution) -> None:
        self.dist = dist

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return sample_proposal(self.dist, n, generator)

    def log_prob(self, z: Tensor) -> Tensor:
        return self.dist.log_prob(z)


def reported_se(result) -> float:
    """Standard error of the mean over examples from the estimator's own per-example errors."""
    se = result["log_px_se"] if isinstance(result, dict) else result.log_px_se
    return float(se.pow(2).sum().sqrt() / se.numel())


def ais(n_steps: int, n_chains: int, leapfrog_steps: int = 10, **kw) -> AnnealedImportanceSampling:
    return AnnealedImportanceSampling(n_steps, n_chains, leapfrog_steps, **kw)


# --------------------------------------------------------------------------- helpers


def test_log_mean_exp_is_stable_and_correct() -> None:
    t = torch.tensor([[1000.0, -1000.0], [1000.0, -1000.0 + math.log(3.0)]], dtype=torch.float64)
    out = log_mean_exp(t, dim=0)
    assert torch.allclose(out, torch.tensor([1000.0, -1000.0 + math.log(2.0)], dtype=torch.float64))
    small = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(log_mean_exp(small, 1), small.exp().mean(1).log())


def test_annealing_schedules_span_zero_to_one() -> None:
    for kind in ("sigmoid", "linear"):
        b = annealing_schedule(50, kind)
        assert b.shape == (51,) and b[0] == 0.0 and b[-1] == 1.0 and (b.diff() > 0).all()
    with pytest.raises(ConfigError, match="schedule"):
        annealing_schedule(10, "cosine")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make",
    [
        lambda m, s: Independent(Normal(m, s), 1),
        lambda m, s: MultivariateNormal(m, scale_tril=torch.diag_embed(s)),
        lambda m, s: Independent(Laplace(m, s), 1),  # no loc + scale * eps path: forked global RNG
    ],
)
def test_sample_proposal_is_reproducible_and_has_the_right_moments(make) -> None:
    mean = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    scale = torch.tensor([[0.5, 2.0]], dtype=torch.float64)
    dist: Distribution = make(mean, scale)
    a = sample_proposal(dist, 4000, torch.Generator().manual_seed(3))
    b = sample_proposal(dist, 4000, torch.Generator().manual_seed(3))
    assert a.shape == (4000, 1, 2) and torch.equal(a, b)
    # mean within 4 SE (std / sqrt(n)) of the distribution's mean
    assert ((a.mean(0) - dist.mean).abs() < N_SE * dist.stddev / math.sqrt(4000)).all()


# --------------------------------------------------------------------------- importance sampling


def test_is_with_exact_posterior_is_exact(setup) -> None:
    lg, model, x, truth = setup
    # p(x, z) / p(z | x) = p(x) for every z: zero-variance weights, any k gives log p(x).
    with torch.no_grad():
        est = importance_sampling(model.log_joint, x, DistributionPosterior(posterior(lg, x)), k=3, chunk_size=2).log_px
    assert torch.allclose(est, truth, rtol=0, atol=1e-10)
    assert all(p.grad is None for p in model.parameters())


def test_is_with_prior_is_within_its_reported_se(setup) -> None:
    _, model, x, truth = setup
    g = torch.Generator().manual_seed(2)
    diag = importance_sampling(model.log_joint, x, DistributionPosterior(standard_normal(N, d, x)), k=4000,
                               chunk_size=1000, generator=g)
    est = diag.log_px
    se = reported_se(diag)
    assert 0 < se < 0.05  # precise enough for the check below to mean something
    assert abs(float(est.mean() - truth.mean())) < N_SE * se
    assert (diag.ess > 1).all() and (diag.ess <= 4000 + 1e-6).all()
    # the half-budget estimate (the convergence diagnostic) is the first 2000 draws' estimate: also close
    assert abs(float(diag.log_px_half.mean() - truth.mean())) < N_SE * se * math.sqrt(2) + 0.01


def test_is_is_a_lower_bound_that_tightens_with_k(setup) -> None:
    lg, model, x, truth = setup
    xr, tr = x.repeat(4, 1), truth.repeat(4)  # 128 estimates to average over
    g = torch.Generator().manual_seed(4)
    gaps = {}
    for k in (1, 10, 100, 1000):
        prior = DistributionPosterior(standard_normal(xr.shape[0], d, xr))
        est = importance_sampling(model.log_joint, xr, prior, k=k, chunk_size=500, generator=g).log_px
        gap = tr - est
        gaps[k] = (float(gap.mean()), float(gap.std() / math.sqrt(gap.numel())))
    # k = 1 with the prior: E[log p(x | z)] = log p(x) - KL(p(z) || p(z | x)) in closed form
    kl = kl_divergence(MultivariateNormal(torch.zeros(d, dtype=x.dtype), torch.eye(d, dtype=x.dtype)), posterior(lg, xr))
    assert abs(gaps[1][0] - float(kl.mean())) < N_SE * gaps[1][1]
    means = [gaps[k][0] for k in (1, 10, 100, 1000)]
    assert means == sorted(means, reverse=True), f"IS gap should shrink with k: {gaps}"
    assert gaps[1000][0] > -N_SE * gaps[1000][1]  # a lower bound in expectation


class _Replay(DistributionPosterior):
    """A proposal that hands out pre-drawn samples in order, so chunked and unchunked IS see the
    same random numbers whatever the chunk size."""

    def __init__(self, samples: Tensor, base: Distribution) -> None:
        super().__init__(base)
        self.samples, self.pos = samples, 0

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        out = self.samples[self.pos : self.pos + n]
        self.pos += n
        return out


def test_chunked_is_equals_unchunked_with_the_same_random_numbers(setup) -> None:
    _, model, x, _ = setup
    base = Independent(Normal(torch.zeros(N, d, dtype=x.dtype), 1.5 * torch.ones(N, d, dtype=x.dtype)), 1)
    z = sample_proposal(base, 103, torch.Generator().manual_seed(5))
    direct = log_mean_exp(model.log_joint(x, z) - base.log_prob(z), 0)
    for chunk in (103, 10, 1):
        result = importance_sampling(model.log_joint, x, _Replay(z, base), k=103, chunk_size=chunk)
        assert torch.allclose(result.log_px, direct, rtol=0, atol=1e-12)
        # the half-budget estimate is the first 51 draws', whatever the chunking
        assert torch.allclose(result.log_px_half, log_mean_exp(model.log_joint(x, z[:51]) - base.log_prob(z[:51]), 0),
                              rtol=0, atol=1e-12)


def test_fitted_gaussian_proposal_from_posterior_samples(setup) -> None:
    lg, model, x, truth = setup
    g = torch.Generator().manual_seed(6)
    mean, log_var = moment_fit(sample_proposal(posterior(lg, x), 200, g))
    q = GaussianPosterior(mean, log_var + 2 * math.log(1.2))  # a proposal wider than the fit, as IS wants
    diag = importance_sampling(model.log_joint, x, q, k=500, generator=g)
    est = diag.log_px
    assert (diag.ess > 100).all()  # a good proposal: most of the 500 samples count
    assert abs(float(est.mean() - truth.mean())) < N_SE * reported_se(diag)


def test_bad_inputs_name_the_problem(setup) -> None:
    _, model, x, _ = setup
    no_density = ImplicitPosterior(lambda n, g: torch.zeros(n, N, d, dtype=x.dtype))
    with pytest.raises(ConfigError, match="density"):
        importance_sampling(model.log_joint, x, no_density, k=2)
    with pytest.raises(ConfigError, match="sample_estimator must be one of auto|is|ais"):
        NLLSettings.coerce({"name": "fast", "sample_estimator": "kde"})
    with pytest.raises(ConfigError, match="kde_bandwidth must be a number > 0"):
        NLLSettings.coerce({"name": "fast", "kde_bandwidth": 0})
    with pytest.raises(ConfigError, match="k >= 1"):
        importance_sampling(model.log_joint, x, DistributionPosterior(standard_normal(N, d, x)), k=0)
    with pytest.raises(ConfigError, match="n_chains"):
        ais(n_steps=10, n_chains=0)


# --------------------------------------------------------------------------- HMC


def test_hmc_samples_the_posterior_and_leaves_parameters_alone(setup) -> None:
    lg, model, x, _ = setup
    post = posterior(lg, x[:4])
    g = torch.Generator().manual_seed(7)
    z0 = torch.zeros(1000, 4, d, dtype=x.dtype)  # start far from most of the mass
    z, diag = HMC(step_size=0.3, n_leapfrog=5, adapt=False).sample(lambda z: model.log_joint(x[:4], z), z0, 30, g)
    # 1000 independent chains: sample mean within 4 SE of the exact posterior mean, per coordinate
    se = post.stddev / math.sqrt(z.shape[0])
    assert ((z.mean(0) - post.mean).abs() < N_SE * se).all()
    # sample variance within 4 SE: Var(s^2) = 2 sigma^4 / (n - 1) for Gaussian draws
    var = post.variance
    assert ((z.var(0) - var).abs() < N_SE * var * math.sqrt(2 / (z.shape[0] - 1))).all()
    assert (diag["accept_rate"] > 0.5).all()
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- AIS


def test_ais_started_at_the_posterior_is_exact(setup) -> None:
    lg, model, x, truth = setup
    # q0 = p(z|x) makes every f_t = p(x)^b_t p(z|x): each increment is (b_t - b_{t-1}) log p(x).
    est, diag = ais(7, 3, leapfrog_steps=2)(model.log_joint, x, posterior(lg, x), return_diagnostics=True)
    assert torch.allclose(est, truth, rtol=0, atol=1e-10)
    assert diag["log_weights"].shape == (3, N) and diag["z"].shape == (3, N, d)
    plain = ais(2, 1)(model.log_joint, x, standard_normal(N, d, x))
    assert isinstance(plain, Tensor) and plain.shape == (N,)


def test_ais_is_within_its_reported_se_and_adapts_to_the_target(setup) -> None:
    _, model, x, truth = setup
    g = torch.Generator().manual_seed(8)
    # many chains make the reported SE ~0.005 nats, small enough to expose the upward bias that
    # weights taken after the transition, or step sizes adapted on the chains themselves, cause
    runner = ais(n_steps=100, n_chains=256, leapfrog_steps=5, target_accept=0.65)
    est, diag = runner(model.log_joint, x, standard_normal(N, d, x), generator=g, return_diagnostics=True)
    se = reported_se(diag)
    assert 0 < se < 0.02
    assert abs(float(est.mean() - truth.mean())) < N_SE * se
    # the pilot-tuned step sizes put the real run's acceptance near the target
    assert abs(float(diag["accept_rate"]) - 0.65) < 0.15
    assert diag["log_weights"].shape == (256, N)
    assert all(p.grad is None for p in model.parameters())


def test_ais_tightens_with_more_steps(setup) -> None:
    _, model, x, truth = setup
    # single chains on 512 rows: the mean log-weight gap E[log p(x) - log w] is large for short
    # runs and well resolved, so "increases with steps" is a 4-SE statement on paired differences
    xr, tr = x.repeat(16, 1), truth.repeat(16)
    g = torch.Generator().manual_seed(9)
    steps = (4, 20, 100)
    prior = standard_normal(xr.shape[0], d, xr)
    est = {t: ais(t, 1, leapfrog_steps=3)(model.log_joint, xr, prior, generator=g) for t in steps}
    for short, long in zip(steps, steps[1:]):
        diff = est[long] - est[short]
        assert float(diff.mean()) > N_SE * float(diff.std()) / math.sqrt(diff.numel()), (short, long)
    gap = tr - est[steps[-1]]
    assert float(gap.mean()) > -N_SE * float(gap.std()) / math.sqrt(gap.numel())  # still a lower bound


# --------------------------------------------------------------------------- BDMC


def test_bdmc_sandwiches_the_truth_and_the_gap_shrinks(setup) -> None:
    lg, model, _, _ = setup
    g = torch.Generator().manual_seed(10)
    results = {}
    for steps in (10, 100):
        r = bdmc(model.log_joint, lambda n, gen: lg.sample(n, gen), 32, ais=ais(steps, 1, leapfrog_steps=5), generator=g)
        truth = lg.log_marginal(r.x)
        for bound, sign in ((r.log_px_lower, 1.0), (r.log_px_upper, -1.0)):
            excess = sign * (bound - truth)  # > 0 would violate the bound
            assert float(excess.mean()) < N_SE * float(excess.std()) / math.sqrt(excess.numel())
        assert r.gap == pytest.approx(r.upper - r.lower)
        results[steps] = r
    assert results[10].gap > N_SE * results[10].gap_se  # a real gap with few steps ...
    assert results[100].gap + N_SE * results[100].gap_se < results[10].gap  # ... that shrinks with more


def test_bdmc_accepts_a_generative_model(setup) -> None:
    _, model, _, _ = setup
    r = bdmc(model.log_joint, model, 4, ais=ais(5, 2, leapfrog_steps=2), generator=torch.Generator().manual_seed(11))
    assert r.x.shape == (4, D) and r.log_px_upper.shape == (4,)
    assert set(r.as_dict()) == {f"bdmc/{k}" for k in ("lower", "upper", "gap", "lower_se", "upper_se", "gap_se")}


# --------------------------------------------------------------------------- metric and configs


def test_loglikelihood_metric_matches_direct_mean_and_se() -> None:
    values = torch.randn(50, generator=torch.Generator().manual_seed(12), dtype=torch.float64) * 5 - 90
    metric = LogLikelihood()
    for part in values.split([7, 30, 13]):
        metric.update(part.float())
    out = metric.compute()
    v = values.float().double()
    assert float(out["nll"]) == pytest.approx(-float(v.mean()), rel=1e-12)
    assert float(out["nll_se"]) == pytest.approx(float(v.std() / math.sqrt(50)), rel=1e-9)
    # states merge by summation, as they would across processes
    a, b = LogLikelihood(), LogLikelihood()
    a.update(values[:20])
    b.update(values[20:])
    a.merge_state(b)
    assert float(a.compute()["nll"]) == pytest.approx(-float(values.mean()), rel=1e-12)
    with pytest.raises(NumericalError, match="non-finite"):
        metric.update(torch.tensor([float("nan")]))


CONF = Path(__file__).resolve().parents[1] / "conf" / "eval" / "nll"


@pytest.mark.parametrize("name", ["fast", "standard", "paper"])
def test_estimator_configs_instantiate(name: str) -> None:
    settings = instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
    assert isinstance(settings, NLLSettings) and settings.name == name
    assert settings == NLLSettings.preset(name)  # the same numbers without Hydra
    if name == "paper":  # the papers' budget: IS k=5000 (Burda et al.), AIS 2000 x 8 (the AVB paper)
        assert (settings.k, settings.ais_steps, settings.ais_chains) == (5000, 2000, 8)


def test_each_budget_default_exists_once() -> None:
    """The budgets live only in conf/eval/nll/*.yaml: the settings class and the AIS runner have no defaults
    for them, and a partial mapping is a change to a named preset."""
    budget = ("name", "estimator", "k", "chunk_size", "ais_steps", "ais_chains", "ais_leapfrog")
    for cls, keys in ((NLLSettings, budget), (AnnealedImportanceSampling, ("n_steps", "n_chains", "leapfrog_steps"))):
        fields = cls.__dataclass_fields__
        assert all(fields[k].default is fields[k].default_factory for k in keys), cls  # both MISSING
    changed = NLLSettings.coerce({"name": "paper", "k": 7})
    assert changed.k == 7 and changed.ais_steps == NLLSettings.preset("paper").ais_steps
    with pytest.raises(ConfigError, match="eval.nll.kk is not a setting of NLLSettings"):
        NLLSettings.coerce({"kk": 3})
    with pytest.raises(ConfigError, match="fast|standard|paper"):
        NLLSettings.coerce("huge")
