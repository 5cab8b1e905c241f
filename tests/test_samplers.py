"""Langevin samplers and MCMC diagnostics against closed forms.

Tolerances are k standard errors of the Monte Carlo estimate in question (fixed seeds), with k = 4
for a family of ~15 comparisons (family-wise false-alarm rate ~1e-3 before fixing the seed).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from scipy.signal import lfilter
from scipy.stats import f as f_dist
from torch import Tensor

from latentlab.analytic import LinearGaussian
from latentlab.samplers import MALA, ULA, AnnealedLangevin, SamplerResult, effective_sample_size, rhat, sampler_preset

K_SE = 4.0


# ----------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def linear_gaussian() -> tuple[LinearGaussian, Tensor]:
    """A 5-d observation, 2-d latent PPCA model and 3 observations; posterior precision eigenvalues ~7 and ~19."""
    gen = torch.Generator().manual_seed(0)
    lg = LinearGaussian.random(5, 2, s2=0.5, generator=gen)
    x, _ = lg.sample(3, generator=gen)
    return lg, x


def assert_gaussian(z: Tensor, mean: Tensor, cov: Tensor, k: float = K_SE) -> None:
    """z (N, batch, d): N independent draws per example match N(mean[b], cov) within k standard errors.

    SE of the sample mean: sqrt(C_ii / N); of a sample covariance entry: sqrt((C_ii C_jj + C_ij^2) / N)
    (Gaussian fourth moments).
    """
    z = z.double()
    mean, cov = mean.double(), cov.double()
    n = z.shape[0]
    var = torch.diagonal(cov)
    mean_se = (var / n).sqrt()
    assert ((z.mean(0) - mean).abs() <= k * mean_se).all(), ((z.mean(0) - mean) / mean_se)
    centred = z - z.mean(0)
    emp = torch.einsum("nbi,nbj->bij", centred, centred) / (n - 1)
    cov_se = ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
    assert ((emp - cov).abs() <= k * cov_se).all(), ((emp - cov) / cov_se)


def mixture_log_prob(z: Tensor, sigma: float = 0.0) -> Tensor:
    """1-d 0.3 N(-4, 0.5^2) + 0.7 N(4, 0.5^2), convolved with N(0, sigma^2) (Song & Ermon's p_sigma)."""
    var = 0.25 + sigma**2
    log_norm = -0.5 * math.log(2 * math.pi * var)
    left = math.log(0.3) + log_norm - (z + 4.0).square() / (2 * var)
    right = math.log(0.7) + log_norm - (z - 4.0).square() / (2 * var)
    return torch.logaddexp(left, right).squeeze(-1)


# ----------------------------------------------------------------------------- ULA / MALA vs closed forms


def test_ula_matches_its_closed_form_stationary_law(linear_gaussian: tuple[LinearGaussian, Tensor]) -> None:
    """For a Gaussian target N(m, A^-1), ULA z' = z - h A (z - m) + sqrt(2h) xi is a linear AR process
    with B = I - h A; its stationary covariance solves C = B C B + 2h I, i.e. C = (A (I - h A / 2))^-1,
    and its mean stays m. h = 0.5 / lambda_max makes the bias large enough to be seen."""
    lg, x = linear_gaussian
    model = lg.to_model()
    mean, post_cov = lg.posterior(x)
    precision = torch.linalg.inv(post_cov.double())
    lam = torch.linalg.eigvalsh(precision)
    h = 0.5 / float(lam.max())
    ula_cov = torch.linalg.inv(precision @ (torch.eye(2, dtype=torch.float64) - h * precision / 2))
    # Burn-in from the derived contraction: the slowest mode shrinks by |1 - h lambda_min| per step.
    n_steps = math.ceil(math.log(1e-8) / math.log(1 - h * float(lam.min())))
    n = 4000
    result = ULA(step_size=h, n_steps=n_steps).sample(
        lambda z: model.log_joint(x, z), torch.zeros(n, 3, 2), generator=torch.Generator().manual_seed(1)
    )
    assert isinstance(result, SamplerResult) and result.z.shape == (n, 3, 2)
    assert_gaussian(result.z, mean, ula_cov)
    # The test can tell ULA's law from the exact posterior: the bias exceeds 2 k standard errors.
    var = torch.diagonal(ula_cov)
    se = ((var[:, None] * var[None, :] + ula_cov**2) / n).sqrt()
    assert ((ula_cov - post_cov.double()).abs() / se).max() > 2 * K_SE
    assert result.diagnostics["n_nonfinite"] == 0.0 and result.diagnostics["grad_norm"] > 0


def test_mala_samples_the_exact_posterior(linear_gaussian: tuple[LinearGaussian, Tensor]) -> None:
    """Same step size that biases ULA above: the Metropolis correction removes the bias."""
    lg, x = linear_gaussian
    model = lg.to_model()
    mean, post_cov = lg.posterior(x)
    n = 3000
    result = MALA(step_size=0.05, n_steps=300, burn_in=100).sample(
        lambda z: model.log_joint(x, z), torch.zeros(n, 3, 2), generator=torch.Generator().manual_seed(2)
    )
    assert result.step_size.shape == (n, 3)
    assert_gaussian(result.z, mean, post_cov)
    assert 0.3 < result.diagnostics["accept_rate"] < 0.9


def test_mala_adaptation_reaches_target_acceptance(linear_gaussian: tuple[LinearGaussian, Tensor]) -> None:
    """Start 6x too large; Robbins-Monro on log s during burn-in, then measure acceptance with the
    per-chain step sizes frozen and passed back in (the persistent-chain use). The measured rate's
    MC error is ~0.05 / sqrt(n chains * steps) < 1e-3, so the 0.02 band is the adaptation's own
    convergence error; twice / half the adapted step must land clearly outside it (the rate is
    monotone in s), which shows the band is informative."""
    lg, x = linear_gaussian
    model = lg.to_model()
    mean, post_cov = lg.posterior(x)
    log_prob = lambda z: model.log_joint(x, z)  # noqa: E731
    gen = torch.Generator().manual_seed(3)
    z0 = mean + torch.randn(1000, 3, 2, generator=gen) @ torch.linalg.cholesky(post_cov).T
    adapted = MALA(step_size=0.5, n_steps=301, burn_in=300, target_accept=0.574).sample(log_prob, z0, generator=gen)
    frozen = MALA(step_size=1.0, n_steps=200, adapt=False)

    def rate(scale: float) -> float:
        res = frozen.sample(log_prob, adapted.z, generator=torch.Generator().manual_seed(4), step_size=adapted.step_size * scale)
        assert torch.equal(res.step_size, adapted.step_size * scale)  # no adaptation when adapt=False
        return float(res.diagnostics["accept_rate"])

    assert abs(rate(1.0) - 0.574) < 0.02
    assert rate(2.0) < 0.574 - 0.05 and rate(0.5) > 0.574 + 0.05


# ----------------------------------------------------------------------------- annealing on a bimodal target


def test_annealed_noise_levels_find_both_modes_with_their_weights_while_ula_stays_stuck() -> None:
    """p_sigma keeps the mixture weights at every level (Song & Ermon 2019, Sec. 3.2), so chains started
    in the light mode end in the heavy one with probability 0.7: binomial SE sqrt(0.21 / n).
    Plain ULA from the same start faces a barrier of ~30 nats (log-density drops by 4^2 / (2 * 0.25)
    between mode and midpoint): Kramers' rate e^-30 * n * steps << 1 crossings, i.e. none."""
    n = 4000
    z0 = torch.full((n, 1), -4.0)
    sampler = AnnealedLangevin(step_size=0.05 * 0.25, n_steps=200, n_levels=10, max_level=10.0, min_level=0.5, mode="noise")
    result = sampler.sample(mixture_log_prob, z0, generator=torch.Generator().manual_seed(5))
    heavy = (result.z[:, 0] > 0).double().mean()
    assert abs(float(heavy) - 0.7) <= K_SE * math.sqrt(0.21 / n)
    # Chains sit in the modes, not between them: the final level's target has sd sqrt(0.5).
    assert ((result.z.abs() - 4.0).abs() < 6 * math.sqrt(0.5)).all()

    stuck = ULA(step_size=0.05 * 0.25, n_steps=2000).sample(
        lambda z: mixture_log_prob(z), z0, generator=torch.Generator().manual_seed(5)
    )
    assert (stuck.z[:, 0] < 0).all()


def test_annealed_tempering_weights_correct_the_mode_proportions() -> None:
    """p^(1/T) gives the modes the mass ratio (0.3/0.7)^(1/T): frozen at T > 1 the chains are biased
    toward 50/50. The AIS log weights restore 0.7 within k SE of a weighted proportion, with SE from
    Kish's effective sample size of the weights."""
    n = 4000
    sampler = AnnealedLangevin(step_size=0.02, n_steps=100, n_levels=10, max_level=50.0, min_level=1.0, mode="temper")
    result = sampler.sample(lambda z: mixture_log_prob(z), torch.full((n, 1), -4.0), generator=torch.Generator().manual_seed(6))
    heavy = (result.z[:, 0] > 0).double()
    assert 0.3 < float(heavy.mean()) < 0.7 - K_SE * math.sqrt(0.21 / n)  # both modes, wrong raw weights
    weights = torch.softmax(result.diagnostics["log_weights"].double(), dim=0)
    kish = float(1.0 / weights.square().sum())
    assert kish > n / 10
    assert abs(float((weights * heavy).sum()) - 0.7) <= K_SE * math.sqrt(0.21 / kish)


def test_annealed_levels_and_step_scaling() -> None:
    noise = AnnealedLangevin(step_size=1e-3, n_steps=2, n_levels=4, max_level=8.0, min_level=1.0, mode="noise")
    assert noise.levels == pytest.approx([8.0, 4.0, 2.0, 1.0])
    assert noise.step_multipliers() == pytest.approx([64.0, 16.0, 4.0, 1.0])  # sigma_i^2 / sigma_L^2
    temper = AnnealedLangevin(step_size=1e-3, n_steps=2, levels=[4.0, 2.0, 1.0])
    assert temper.step_multipliers() == pytest.approx([4.0, 2.0, 1.0])  # T_i / T_L
    with pytest.raises(ValueError, match="non-increasing"):
        AnnealedLangevin(step_size=1e-3, n_steps=2, levels=[1.0, 2.0])


# ----------------------------------------------------------------------------- the contract ALMOND relies on


@pytest.mark.parametrize(
    ("sampler", "evaluations"),
    [(ULA(0.01, 7), 7), (ULA(0.01, 7, guard=True), 8), (MALA(0.01, 7), 8), (AnnealedLangevin(0.01, 2, n_levels=3), 6)],
)
def test_gradients_wrt_z_only_one_evaluation_per_step_and_no_grad_safe(
    linear_gaussian: tuple[LinearGaussian, Tensor], sampler: ULA | MALA | AnnealedLangevin, evaluations: int
) -> None:
    """Parameters never get .grad, sampling works under a caller's no_grad, and each step costs one
    forward+backward (MALA and the guard one more, at z0 / at the end)."""
    lg, x = linear_gaussian
    model = lg.to_model()
    calls = []

    def log_prob(z: Tensor) -> Tensor:
        calls.append(z.shape)
        return model.log_joint(x, z)

    with torch.no_grad():
        result = sampler.sample(log_prob, torch.zeros(4, 3, 2), generator=torch.Generator().manual_seed(0))
    assert len(calls) == evaluations and all(shape == (4, 3, 2) for shape in calls)
    assert all(p.grad is None for p in model.parameters())
    assert not result.z.requires_grad and result.z.shape == (4, 3, 2)
    assert not torch.equal(result.z, torch.zeros(4, 3, 2))


@pytest.mark.parametrize(
    "sampler",
    [ULA(0.05, 20, burn_in=5, thin=3, step_schedule="poly"), MALA(0.05, 20, burn_in=5, thin=3), AnnealedLangevin(0.05, 20, n_levels=2, burn_in=5, thin=3)],
)
def test_same_seed_same_samples_and_kept_samples_layout(
    linear_gaussian: tuple[LinearGaussian, Tensor], sampler: ULA | MALA | AnnealedLangevin
) -> None:
    lg, x = linear_gaussian
    model = lg.to_model()
    log_prob = lambda z: model.log_joint(x, z)  # noqa: E731
    z0 = torch.zeros(5, 3, 2)
    runs = [sampler.sample(log_prob, z0, generator=torch.Generator().manual_seed(s), keep_samples=True) for s in (7, 7, 8)]
    assert torch.equal(runs[0].samples, runs[1].samples) and torch.equal(runs[0].z, runs[1].z)
    assert not torch.equal(runs[0].z, runs[2].z)
    assert runs[0].samples.shape == ((20 - 5) // 3, 5, 3, 2)
    assert torch.equal(runs[0].samples[-1], runs[0].z)  # (20 - 5) % 3 == 0: the final state is kept
    assert sampler.sample(log_prob, z0, generator=torch.Generator().manual_seed(7)).samples is None


def test_kept_samples_are_the_trajectory_after_burn_in(linear_gaussian: tuple[LinearGaussian, Tensor]) -> None:
    """The random stream is consumed step by step, so a k-step run ends where the long run was after k steps."""
    lg, x = linear_gaussian
    model = lg.to_model()
    log_prob = lambda z: model.log_joint(x, z)  # noqa: E731
    z0 = torch.zeros(5, 3, 2)
    full = ULA(0.05, 9, burn_in=3, thin=2).sample(log_prob, z0, generator=torch.Generator().manual_seed(9), keep_samples=True)
    for i, k in enumerate((5, 7, 9)):
        short = ULA(0.05, k).sample(log_prob, z0, generator=torch.Generator().manual_seed(9))
        torch.testing.assert_close(full.samples[i], short.z, rtol=0, atol=0)


def test_poly_schedule_decays_from_the_given_step() -> None:
    ula = ULA(0.1, 5, step_schedule="poly", schedule_gamma=0.5, schedule_t0=1.0)
    assert ula.multipliers() == pytest.approx([(1.0 + t) ** -0.5 for t in range(5)])
    assert ULA(0.1, 3).multipliers() == [1.0, 1.0, 1.0]


def bounded_log_prob(z: Tensor) -> Tensor:
    """N(0, 1) times sqrt(1 - z) on z < 1: beyond the boundary value and gradient are NaN."""
    return -0.5 * z.square().sum(-1) + torch.log(torch.sqrt(1.0 - z[..., 0]))


@pytest.mark.parametrize("cls", [ULA, MALA])
def test_guard_rejects_nonfinite_steps_and_halves_step_size(cls: type[ULA] | type[MALA]) -> None:
    z0 = torch.zeros(200, 1)
    step = 0.8
    kwargs = {"adapt": False} if cls is MALA else {}
    guarded = cls(step, 30, guard=True, **kwargs).sample(bounded_log_prob, z0, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(guarded.z).all() and (guarded.z < 1).all()
    assert guarded.diagnostics["n_nonfinite"] > 0
    halvings = torch.log2(step / guarded.step_size.double())
    torch.testing.assert_close(halvings, halvings.round(), rtol=0, atol=1e-6)  # only ever halved
    halvings = halvings.round()
    assert (halvings >= 0).all() and (halvings > 0).any()
    assert torch.equal(guarded.diagnostics["nonfinite_per_chain"].double(), halvings)
    if cls is ULA:  # without the guard the NaNs pass through to the caller
        unguarded = cls(step, 30).sample(bounded_log_prob, z0, generator=torch.Generator().manual_seed(0))
        assert (~torch.isfinite(unguarded.z)).any() and unguarded.diagnostics["n_nonfinite"] > 0


def test_per_chain_step_sizes_and_bad_arguments(linear_gaussian: tuple[LinearGaussian, Tensor]) -> None:
    lg, x = linear_gaussian
    model = lg.to_model()
    log_prob = lambda z: model.log_joint(x, z)  # noqa: E731
    steps = torch.tensor([0.01, 0.02, 0.04]).expand(4, 3)
    result = ULA(0.5, 2).sample(log_prob, torch.zeros(4, 3, 2), step_size=steps)
    assert torch.equal(result.step_size, steps)
    for bad_step in (-0.1, torch.tensor([0.01, 0.0, 0.04]).expand(4, 3)):  # a call's number or per-chain CPU tensor
        with pytest.raises(ValueError, match="step_size must be > 0"):
            ULA(0.5, 2).sample(log_prob, torch.zeros(4, 3, 2), step_size=bad_step)
    with pytest.raises(ValueError, match="log_prob must map"):
        ULA(0.1, 2).sample(lambda z: model.log_joint(x, z).sum(), torch.zeros(4, 3, 2))
    for bad in (dict(step_size=0.0, n_steps=5), dict(step_size=0.1, n_steps=0), dict(step_size=0.1, n_steps=5, burn_in=5)):
        with pytest.raises(ValueError):
            ULA(**bad)
    with pytest.raises(ValueError, match="step_schedule"):
        ULA(0.1, 5, step_schedule="cosine")
    with pytest.raises(ValueError, match="target_accept"):
        MALA(0.1, 5, target_accept=1.5)
    with pytest.raises(ValueError, match="mode"):
        AnnealedLangevin(0.1, 5, mode="fast")


@pytest.mark.parametrize("name, cls", [("ula", ULA), ("mala", MALA), ("annealed", AnnealedLangevin)])
def test_hydra_configs_instantiate(repo_root: Path, name: str, cls: type) -> None:
    sampler = instantiate(OmegaConf.load(repo_root / "conf" / "sampler" / f"{name}.yaml"))
    assert type(sampler) is cls


# ----------------------------------------------------------------------------- diagnostics


def ar1(rho: float, n: int, m: int, coords: int, seed: int) -> np.ndarray:
    """Stationary AR(1), unit variance: x_t = rho x_{t-1} + sqrt(1 - rho^2) e_t; tau = (1 + rho) / (1 - rho)."""
    eps = np.random.default_rng(seed).standard_normal((n + 400, m, coords))
    return lfilter([math.sqrt(1.0 - rho**2)], [1.0, -rho], eps, axis=0)[400:]  # rho^400 ~ 0: stationary


def test_rhat_of_iid_chains_follows_its_exact_distribution() -> None:
    """iid N(0, 1) in M split chains of n' draws: B / W ~ F(M - 1, M (n' - 1)) exactly, and
    R-hat = sqrt((n' - 1 + F) / n'). Every coordinate lies within the two-sided 1e-4 / coords quantiles."""
    n, m, coords = 1000, 4, 50
    draws = np.random.default_rng(0).standard_normal((n, m, coords))
    half, chains = n // 2, 2 * m
    lo, hi = (math.sqrt((half - 1 + f_dist.ppf(q, chains - 1, chains * (half - 1))) / half) for q in (1e-4 / coords, 1 - 1e-4 / coords))
    for rank_normalize in (False, True):  # normal scores of iid normals are (nearly) iid normal
        r = rhat(draws, rank_normalize=rank_normalize)
        assert r.shape == (coords,)
        assert ((r >= lo) & (r <= hi)).all(), (r.min(), r.max(), lo, hi)


def test_rhat_flags_chains_that_disagree_or_drift() -> None:
    """Two of four chains shifted by 1 sd, or one chain drifting from -1 to +1 sd (same overall mean,
    caught only by splitting): both far above the iid upper quantile (~1.003 here) and Vehtari's 1.01."""
    rng = np.random.default_rng(1)
    draws = rng.standard_normal((1000, 4, 3))
    shifted = draws.copy()
    shifted[:, :2] += 1.0
    drifting = draws.copy()
    drifting[:, 0] += np.linspace(-1.0, 1.0, 1000)[:, None]
    assert (rhat(shifted) > 1.05).all() and (rhat(drifting) > 1.01).all()


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_ess_of_ar1_chains_matches_n_over_tau(rho: float) -> None:
    """ESS / (n m) should be (1 - rho) / (1 + rho); the check is on the mean over 50 independent
    coordinates, within k SE estimated from their spread (Geyer's estimator's small-sample bias,
    ~0.2 of one coordinate's sd, is well inside)."""
    n, m, coords = 2000, 4, 50
    tau = (1.0 + rho) / (1.0 - rho)
    ratio = effective_sample_size(ar1(rho, n, m, coords, seed=2)).numpy() * tau / (n * m)
    assert ratio.shape == (coords,)
    assert abs(ratio.mean() - 1.0) <= K_SE * ratio.std(ddof=1) / math.sqrt(coords)


def reference_ess(chains: np.ndarray) -> float:
    """Vehtari et al. (2021) eq. 10 with Geyer's initial monotone sequence, one coordinate, plain loops."""
    n, m = chains.shape
    centred = chains - chains.mean(0)
    acov = np.array([[centred[: n - t, j] @ centred[t:, j] / n for t in range(n)] for j in range(m)])
    within = acov[:, 0].mean() * n / (n - 1)
    var_plus = within * (n - 1) / n + chains.mean(0).var(ddof=1)
    rho = 1.0 - (within - acov.mean(0)) / var_plus
    rho[0] = 1.0
    tau, running_min = -1.0, math.inf
    for k in range(n // 2):
        pair = rho[2 * k] + rho[2 * k + 1]
        if pair <= 0:
            break
        running_min = min(running_min, pair)
        tau += 2.0 * running_min
    return n * m / max(tau, 1.0 / math.log10(n * m))


def test_vectorised_ess_equals_the_loop_definition_and_bulk_is_rank_invariant() -> None:
    draws = ar1(0.7, 201, 3, 4, seed=3)
    ess = effective_sample_size(draws, rank_normalize=False, split=False).numpy()
    np.testing.assert_allclose(ess, [reference_ess(draws[:, :, c]) for c in range(4)], rtol=1e-10)
    split = np.concatenate([draws[:100], draws[101:]], axis=1)  # odd n: the middle draw is dropped
    ess_split = effective_sample_size(draws, rank_normalize=False).numpy()
    np.testing.assert_allclose(ess_split, [reference_ess(split[:, :, c]) for c in range(4)], rtol=1e-10)
    # Bulk-ESS depends only on ranks: a monotone transform changes nothing.
    torch.testing.assert_close(effective_sample_size(np.exp(3 * draws)), effective_sample_size(draws))


# ----------------------------------------------------------------------------- MALA on persistent chains


def stiff_log_prob(z: Tensor) -> Tensor:
    """N(0, diag(1, 0.04)): a stiff direction (sd 0.2) sets the step size; the wide one barely moves."""
    return -0.5 * (z[..., 0].square() + z[..., 1].square() / 0.04)


def run_as_almond(sampler: MALA, z: Tensor, calls: int, carry_counts: bool) -> Tensor:
    """`calls` short calls on persistent chains, step sizes (and, with carry_counts, move counts) carried over."""
    step, count = None, None
    for call in range(calls):
        result = sampler.sample(stiff_log_prob, z, generator=torch.Generator().manual_seed(100 + call),
                                step_size=step, step_count=count if carry_counts else None)
        z, step, count = result.z, result.step_size, result.step_count
    return z


def test_mala_on_persistent_chains_is_invariant_once_adaptation_stops() -> None:
    """Chains started exactly at the target, 100 calls of 5 moves as ALMOND makes them. Adaptation counted per
    chain across calls (the shipped adapt_window) then frozen leaves the target invariant: the stiff
    direction's variance ratio is 1 within 0.03. n independent chains estimate a variance with relative SE
    sqrt(2 / n) = 0.0045 at n = 1e5, so 4 SE = 0.018 leaves the band to the sampler. Restarting the adaptation
    at every call (the old per-call rate) keeps it state-dependent forever and shrinks that variance (~0.92)."""
    n = 100_000
    sampler = sampler_preset("mala").with_steps(5)
    assert isinstance(sampler, MALA) and sampler.window() == 100
    start = torch.randn(n, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 0.2])
    frozen = run_as_almond(sampler, start, 100, carry_counts=True)
    assert abs(float(frozen[:, 1].var()) / 0.04 - 1.0) < 0.03
    restarted = run_as_almond(sampler, start, 100, carry_counts=False)
    assert float(restarted[:, 1].var()) / 0.04 < 1.0 - 4 * math.sqrt(2 / n)


@pytest.mark.parametrize("guard", [False, True])
def test_ula_on_a_joint_density_moves_by_its_score_to_the_same_chains(guard: bool) -> None:
    """`model.joint(x)` hands ULA the gradient alone (no log-density) unless the guard needs the value: in float64 the
    chains and the non-finite counts equal those of the plain log-density to rounding, a NaN decoder output included."""
    from latentlab import BernoulliLikelihood, GenerativeModel
    from latentlab.nets import NetSpec, build_decoder

    g = torch.Generator().manual_seed(4)
    model = GenerativeModel(build_decoder(NetSpec(kind="mlp", hidden_dims=(16,)), 2, 10), BernoulliLikelihood(), 2).double()
    x = (torch.rand(6, 10, generator=g) > 0.5).double()
    z0 = torch.randn(5, 6, 2, generator=g, dtype=torch.float64)
    z0[0, 0, 0] = float("nan")
    calls: list[int] = []
    joint = model.joint(x)
    score = joint.score
    joint.score = lambda z: calls.append(1) or score(z)  # type: ignore[method-assign]
    results = [ULA(0.05, 8, guard=guard).sample(target, z0, torch.Generator().manual_seed(1))
               for target in (joint, lambda z: model.log_joint(x, z))]
    torch.testing.assert_close(results[0].z, results[1].z, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert results[0].diagnostics["n_nonfinite"] == results[1].diagnostics["n_nonfinite"] > 0
    assert len(calls) == (0 if guard else 8)
