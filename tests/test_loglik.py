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
from latentlab.metrics import (
    AnnealedImportanceSampling,
    ImportanceSampling,
    LogLikelihood,
    ais_log_likelihood,
    annealing_schedule,
    bdmc,
    fit_gaussian_proposal,
    importance_sampling_log_likelihood,
    log_mean_exp,
    sample_proposal,
)
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


def reported_se(diagnostics: dict[str, Tensor]) -> float:
    """Standard error of the mean over examples from the estimator's own per-example errors."""
    se = diagnostics["log_px_se"]
    return float(se.pow(2).sum().sqrt() / se.numel())


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
        est = importance_sampling_log_likelihood(model.log_joint, posterior(lg, x), x, k=3, chunk_size=2)
    assert torch.allclose(est, truth, rtol=0, atol=1e-10)
    assert all(p.grad is None for p in model.parameters())


def test_is_with_prior_is_within_its_reported_se(setup) -> None:
    _, model, x, truth = setup
    g = torch.Generator().manual_seed(2)
    est, diag = ImportanceSampling(k=4000, chunk_size=1000)(model.log_joint, x, generator=g, return_diagnostics=True)
    se = reported_se(diag)
    assert 0 < se < 0.05  # precise enough for the check below to mean something
    assert abs(float(est.mean() - truth.mean())) < N_SE * se
    assert (diag["ess"] > 1).all() and (diag["ess"] <= 4000 + 1e-6).all()


def test_is_is_a_lower_bound_that_tightens_with_k(setup) -> None:
    lg, model, x, truth = setup
    xr, tr = x.repeat(4, 1), truth.repeat(4)  # 128 estimates to average over
    g = torch.Generator().manual_seed(4)
    gaps = {}
    for k in (1, 10, 100, 1000):
        est = importance_sampling_log_likelihood(model.log_joint, None, xr, k=k, chunk_size=500, latent_dim=d, generator=g)
        gap = tr - est
        gaps[k] = (float(gap.mean()), float(gap.std() / math.sqrt(gap.numel())))
    # k = 1 with the prior: E[log p(x | z)] = log p(x) - KL(p(z) || p(z | x)) in closed form
    kl = kl_divergence(MultivariateNormal(torch.zeros(d, dtype=x.dtype), torch.eye(d, dtype=x.dtype)), posterior(lg, xr))
    assert abs(gaps[1][0] - float(kl.mean())) < N_SE * gaps[1][1]
    means = [gaps[k][0] for k in (1, 10, 100, 1000)]
    assert means == sorted(means, reverse=True), f"IS gap should shrink with k: {gaps}"
    assert gaps[1000][0] > -N_SE * gaps[1000][1]  # a lower bound in expectation


class _Replay(Distribution):
    """A proposal that hands out pre-drawn samples in order, so chunked and unchunked IS see the
    same random numbers whatever the chunk size."""

    arg_constraints: dict = {}

    def __init__(self, samples: Tensor, base: Distribution) -> None:
        self.samples, self.base, self.pos = samples, base, 0
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        n = sample_shape[0]
        out = self.samples[self.pos : self.pos + n]
        self.pos += n
        return out

    def log_prob(self, value: Tensor) -> Tensor:
        return self.base.log_prob(value)


def test_chunked_is_equals_unchunked_with_the_same_random_numbers(setup) -> None:
    _, model, x, _ = setup
    base = Independent(Normal(torch.zeros(N, d, dtype=x.dtype), 1.5 * torch.ones(N, d, dtype=x.dtype)), 1)
    z = sample_proposal(base, 103, torch.Generator().manual_seed(5))
    direct = log_mean_exp(model.log_joint(x, z) - base.log_prob(z), 0)
    for chunk in (103, 10, 1):
        est = importance_sampling_log_likelihood(model.log_joint, _Replay(z, base), x, k=103, chunk_size=chunk)
        assert torch.allclose(est, direct, rtol=0, atol=1e-12)


def test_fitted_gaussian_proposal_from_posterior_samples(setup) -> None:
    lg, model, x, truth = setup
    g = torch.Generator().manual_seed(6)
    q = fit_gaussian_proposal(sample_proposal(posterior(lg, x), 200, g))
    est, diag = importance_sampling_log_likelihood(model.log_joint, q, x, k=500, generator=g, return_diagnostics=True)
    assert (diag["ess"] > 100).all()  # a good proposal: most of the 500 samples count
    assert abs(float(est.mean() - truth.mean())) < N_SE * reported_se(diag)


def test_bad_inputs_name_the_problem(setup) -> None:
    _, model, x, _ = setup
    wrong = Independent(Normal(torch.zeros(N + 1, d), torch.ones(N + 1, d)), 1)
    with pytest.raises(ConfigError, match="batch_shape"):
        importance_sampling_log_likelihood(model.log_joint, wrong, x, k=2)
    with pytest.raises(ConfigError, match="latent_dim"):
        importance_sampling_log_likelihood(lambda x, z: model.log_joint(x, z), None, x, k=2)
    with pytest.raises(ConfigError, match="n_chains"):
        AnnealedImportanceSampling(n_chains=0)


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
    est, diag = ais_log_likelihood(model.log_joint, x, n_steps=7, n_chains=3, init=posterior(lg, x), leapfrog_steps=2)
    assert torch.allclose(est, truth, rtol=0, atol=1e-10)
    assert diag["log_weights"].shape == (3, N) and diag["z"].shape == (3, N, d)
    _, nothing = ais_log_likelihood(model.log_joint, x, n_steps=2, n_chains=1, return_diagnostics=False)
    assert nothing == {}


def test_ais_is_within_its_reported_se_and_adapts_to_the_target(setup) -> None:
    _, model, x, truth = setup
    g = torch.Generator().manual_seed(8)
    # many chains make the reported SE ~0.005 nats, small enough to expose the upward bias that
    # weights taken after the transition, or step sizes adapted on the chains themselves, cause
    ais = AnnealedImportanceSampling(n_steps=100, n_chains=256, leapfrog_steps=5, target_accept=0.65)
    est, diag = ais(model.log_joint, x, generator=g, return_diagnostics=True)
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
    est = {t: ais_log_likelihood(model.log_joint, xr, n_steps=t, n_chains=1, leapfrog_steps=3, generator=g)[0] for t in steps}
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
        ais = AnnealedImportanceSampling(n_steps=steps, n_chains=1, leapfrog_steps=5)
        r = bdmc(model.log_joint, lambda n, gen: lg.sample(n, gen), 32, ais=ais, generator=g)
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
    ais = AnnealedImportanceSampling(n_steps=5, n_chains=2, leapfrog_steps=2)
    r = bdmc(model.log_joint, model, 4, ais=ais, generator=torch.Generator().manual_seed(11))
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


@pytest.mark.parametrize(
    ("name", "cls"), [("is", ImportanceSampling), ("ais", AnnealedImportanceSampling), ("ais_fast", AnnealedImportanceSampling)]
)
def test_estimator_configs_instantiate(name: str, cls: type) -> None:
    estimator = instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
    assert isinstance(estimator, cls)
    if name == "ais":  # the AVB paper's evaluation setting
        assert (estimator.n_steps, estimator.n_chains) == (2000, 8)
