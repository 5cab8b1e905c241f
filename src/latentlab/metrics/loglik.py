"""Estimators of log p(x) (nats per example) that need only `log_joint(x, z)` and an optional proposal.

- importance sampling (IS): log (1/k) sum_i p(x, z_i) / q(z_i), z_i ~ q(z | x); a stochastic lower
  bound (Jensen) that tightens with k (Burda et al. 2016).
- annealed importance sampling (AIS, Neal 2001) along the geometric path
  f_t(z) = q0(z)^(1 - b_t) p(x, z)^(b_t) with HMC transitions; also a stochastic lower bound.
- bidirectional Monte Carlo (BDMC, Grosse, Ghahramani & Adams 2015): on data simulated from the
  model, reverse AIS started at the exact posterior sample gives a stochastic upper bound, so the
  true log p(x) is sandwiched and the gap measures how far AIS is from converged.
- `LogLikelihood`: a torchmetrics Metric averaging per-example estimates into `nll` +/- `nll_se`.

Shapes: x is (batch, D); z is (..., batch, d); `log_joint(x, z) -> (..., batch)`. A proposal is a
`torch.distributions.Distribution` with batch_shape (batch,) and event_shape (d,).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Union

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal
from torchmetrics import Metric

from latentlab.errors import ConfigError, NumericalError
from latentlab.samplers.hmc import Point, adapt_step_size, hmc_step

LogJoint = Callable[[Tensor, Tensor], Tensor]
Simulator = Callable[[int, Union[torch.Generator, None]], tuple[Tensor, Tensor]]
Schedule = Literal["sigmoid", "linear"]


# --------------------------------------------------------------------------- helpers


def log_mean_exp(t: Tensor, dim: int = 0, keepdim: bool = False) -> Tensor:
    """log(mean(exp(t))) along `dim` without overflow (logsumexp shifts by the max)."""
    return torch.logsumexp(t, dim=dim, keepdim=keepdim) - math.log(t.shape[dim])


def standard_normal(batch: int, latent_dim: int, like: Tensor) -> Distribution:
    """The prior N(0, I) as a proposal with batch_shape (batch,), on `like`'s device and dtype."""
    zeros = torch.zeros(batch, latent_dim, device=like.device, dtype=like.dtype)
    return Independent(Normal(zeros, torch.ones_like(zeros)), 1)


def _normal_parts(dist: Distribution) -> tuple[Tensor, Tensor] | None:
    """(loc, scale) of an Independent(Normal) / Normal, so we can draw with our own generator."""
    base = dist.base_dist if isinstance(dist, Independent) else dist
    if isinstance(base, Normal):
        return base.loc, base.scale
    return None


def sample_proposal(dist: Distribution, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n draws from `dist`, shape (n, *batch_shape, *event_shape), reproducible through `generator`.

    torch.distributions' `.sample` has no generator argument, so Normal-family proposals are drawn
    as loc + scale * eps with eps from `generator`; any other distribution is sampled under a
    forked global RNG seeded from `generator` (still reproducible, global state untouched).
    """
    shape = torch.Size((n,)) + dist.batch_shape + dist.event_shape
    parts = _normal_parts(dist)
    if parts is not None:
        loc, scale = parts
        eps = torch.randn(shape, generator=generator, device=loc.device, dtype=loc.dtype)
        return loc + scale * eps
    if isinstance(dist, MultivariateNormal):
        eps = torch.randn(shape, generator=generator, device=dist.loc.device, dtype=dist.loc.dtype)
        return dist.loc + (dist.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
    if generator is None:
        return dist.sample((n,))
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    devices = [generator.device] if generator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return dist.sample((n,))


def _proposal_std(dist: Distribution) -> Tensor | None:
    """Per-dimension std of a Gaussian proposal (used to precondition HMC), else None."""
    parts = _normal_parts(dist)
    if parts is not None:
        return parts[1].expand(dist.batch_shape + dist.event_shape)
    if isinstance(dist, MultivariateNormal):
        return dist.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()
    return None


def _resolve_proposal(
    proposal: Distribution | None, log_joint: LogJoint, x: Tensor, latent_dim: int | None
) -> Distribution:
    """The given proposal, or the N(0, I) prior (latent_dim given or read from a model's bound method)."""
    if proposal is not None:
        if proposal.batch_shape != x.shape[:1] or len(proposal.event_shape) != 1:
            raise ConfigError(
                f"proposal must have batch_shape ({x.shape[0]},) and a 1-d event_shape (d,), got "
                f"batch_shape {tuple(proposal.batch_shape)}, event_shape {tuple(proposal.event_shape)}"
            )
        return proposal
    latent_dim = latent_dim or getattr(getattr(log_joint, "__self__", None), "latent_dim", None)
    if latent_dim is None:
        raise ConfigError("no proposal given: pass latent_dim (or a GenerativeModel.log_joint) to use the N(0, I) prior")
    return standard_normal(x.shape[0], int(latent_dim), x)


def mean_and_se(t: Tensor) -> tuple[float, float]:
    """Mean over examples and its standard error std / sqrt(n) (nan for a single example)."""
    n = t.numel()
    return float(t.mean()), float(t.std() / math.sqrt(n)) if n > 1 else float("nan")


def _weight_stats(lse: Tensor, lse2: Tensor, k: int) -> dict[str, Tensor]:
    """From log sum w and log sum w^2 over k weights: effective sample size (sum w)^2 / sum w^2 and
    the delta-method standard error of log mean(w): Var(mean w) / mean(w)^2 = (1/k)(k/ESS - 1),
    so se = sqrt(1/ESS - 1/k). It is itself estimated from the k weights, so it is optimistic when
    the weights are heavy-tailed (a tiny ESS is the warning sign)."""
    ess = torch.exp(2 * lse - lse2)
    return {"ess": ess, "log_px_se": (1.0 / ess - 1.0 / k).clamp(min=0.0).sqrt()}


def fit_gaussian_proposal(samples: Tensor, std_inflation: float = 1.2, min_std: float = 1e-3) -> Distribution:
    """Diagonal Gaussian per example fitted to posterior samples (n, batch, d), e.g. ALMOND's
    Langevin chains or AVB's implicit-encoder draws, for use as an IS proposal.

    The std is inflated because IS needs a proposal at least as wide as the posterior: finite,
    correlated chains under-estimate the spread, and a too-narrow q makes the weights heavy-tailed
    while a slightly wide one only costs a little efficiency.
    """
    if samples.dim() != 3 or samples.shape[0] < 2:
        raise ConfigError(f"samples must be (n >= 2, batch, d), got {tuple(samples.shape)}")
    std = samples.std(0).clamp(min=min_std) * std_inflation
    return Independent(Normal(samples.mean(0), std), 1)


# --------------------------------------------------------------------------- importance sampling


@torch.no_grad()
def importance_sampling_log_likelihood(
    log_joint: LogJoint,
    proposal: Distribution | None,
    x: Tensor,
    k: int = 1000,
    chunk_size: int = 100,
    generator: torch.Generator | None = None,
    latent_dim: int | None = None,
    return_diagnostics: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """log p(x) ~= log (1/k) sum_i p(x, z_i) / q(z_i), z_i ~ q; returns (batch,).

    Samples are drawn `chunk_size` at a time and folded into running log-sum-exps of w and w^2, so
    memory is O(chunk_size * batch) whatever k is. `proposal=None` uses the N(0, I) prior.
    Diagnostics: per-example `ess` and `log_px_se` (delta-method standard error).
    """
    if k < 1 or chunk_size < 1:
        raise ConfigError(f"importance sampling needs k >= 1 and chunk_size >= 1, got k={k}, chunk_size={chunk_size}")
    q = _resolve_proposal(proposal, log_joint, x, latent_dim)
    lse = torch.full(x.shape[:1], -torch.inf, device=x.device, dtype=x.dtype)
    lse2 = lse.clone()
    for start in range(0, k, chunk_size):
        z = sample_proposal(q, min(chunk_size, k - start), generator)
        log_w = log_joint(x, z) - q.log_prob(z)
        lse = torch.logaddexp(lse, torch.logsumexp(log_w, 0))
        lse2 = torch.logaddexp(lse2, torch.logsumexp(2 * log_w, 0))
    log_px = lse - math.log(k)
    if not return_diagnostics:
        return log_px
    return log_px, _weight_stats(lse, lse2, k)


@dataclass
class ImportanceSampling:
    """IS settings (conf/eval/nll/is.yaml) as an estimator with the signature every estimator shares:
    `(log_joint, x, proposal=None, generator=None, ...)`; `proposal=None` means the prior."""

    k: int = 5000
    chunk_size: int = 500

    def __call__(
        self,
        log_joint: LogJoint,
        x: Tensor,
        proposal: Distribution | None = None,
        generator: torch.Generator | None = None,
        latent_dim: int | None = None,
        return_diagnostics: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        return importance_sampling_log_likelihood(
            log_joint, proposal, x, self.k, self.chunk_size, generator, latent_dim, return_diagnostics
        )


# --------------------------------------------------------------------------- AIS


def annealing_schedule(n_steps: int, kind: Schedule = "sigmoid", delta: float = 4.0) -> Tensor:
    """Inverse temperatures 0 = b_0 < ... < b_T = 1 (float64, T = n_steps).

    "sigmoid" (Grosse et al. 2015; Wu et al. 2017) spends more steps near both ends, where the
    geometric path changes fastest; "linear" is evenly spaced.
    """
    if n_steps < 1:
        raise ConfigError(f"AIS needs n_steps >= 1, got {n_steps}")
    t = torch.linspace(-delta, delta, n_steps + 1, dtype=torch.float64)
    if kind == "linear":
        return (t + delta) / (2 * delta)
    if kind == "sigmoid":
        s = torch.sigmoid(t)
        return (s - s[0]) / (s[-1] - s[0])
    raise ConfigError(f"unknown AIS schedule {kind!r}; choose 'sigmoid' or 'linear'")


class _GeometricPath:
    """log f_b(z) = (1 - b) log q0(z) + b log p(x, z), evaluated once per z for both ends so that
    the current point can be re-weighted to any b without another network pass."""

    def __init__(self, log_joint: LogJoint, x: Tensor, q0: Distribution) -> None:
        self.log_joint, self.x, self.q0 = log_joint, x, q0

    def ends(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(log q0, log p(x, z), their gradients w.r.t. z), all detached."""
        with torch.enable_grad():
            z_leaf = z.detach().requires_grad_(True)
            lj = self.log_joint(self.x, z_leaf)
            (g_lj,) = torch.autograd.grad(lj.sum(), z_leaf)
            lq = self.q0.log_prob(z_leaf)
            (g_lq,) = torch.autograd.grad(lq.sum(), z_leaf)
        return lq.detach(), lj.detach(), g_lq.detach(), g_lj.detach()

    @staticmethod
    def at(beta: float, z: Tensor, aux: tuple[Tensor, ...]) -> Point:
        lq, lj, g_lq, g_lj = aux
        return Point(z, (1 - beta) * lq + beta * lj, (1 - beta) * g_lq + beta * g_lj, aux)

    def target(self, beta: float) -> Callable[[Tensor], Point]:
        return lambda z: self.at(beta, z.detach(), self.ends(z))


@dataclass
class AnnealedImportanceSampling:
    """AIS with HMC transitions: the settings (conf/eval/nll/ais.yaml, ais_fast.yaml) and the runner.

    Called as `(log_joint, x, proposal=None, generator=None, ...)`, the signature every estimator
    shares; `proposal` is q0 (default the N(0, I) prior; an encoder's q(z|x) needs far fewer steps).

    Step sizes are per example and per intermediate distribution. With `adapt`, they are tuned
    toward `target_accept` on a separate pilot run of `pilot_chains` chains and then frozen for the
    real run: adapting a chain's step size from its own past acceptances makes its kernels depend
    on its history, which biases the AIS weights upwards (measurably so on a linear-Gaussian
    model); kernels fixed by an independent pilot keep every weight exactly unbiased, for about
    pilot_chains / n_chains extra cost. With `precondition`, a Gaussian q0's std scales the step
    per dimension (as in the AVB paper's AIS code).
    """

    n_steps: int = 2000
    n_chains: int = 8
    schedule: str = "sigmoid"
    leapfrog_steps: int = 10
    step_size: float = 0.05
    target_accept: float = 0.65
    adapt: bool = True
    adapt_rate: float = 0.2
    pilot_chains: int = 1
    precondition: bool = True

    def __post_init__(self) -> None:
        problems = [
            f"{name}={getattr(self, name)} (must be {rule})"
            for name, ok, rule in (
                ("n_steps", self.n_steps >= 1, ">= 1"),
                ("n_chains", self.n_chains >= 1, ">= 1"),
                ("leapfrog_steps", self.leapfrog_steps >= 1, ">= 1"),
                ("step_size", self.step_size > 0, "> 0"),
                ("target_accept", 0.0 < self.target_accept < 1.0, "in (0, 1)"),
                ("adapt_rate", self.adapt_rate >= 0, ">= 0"),
                ("pilot_chains", self.pilot_chains >= 1, ">= 1"),
                ("schedule", self.schedule in ("sigmoid", "linear"), "'sigmoid' or 'linear'"),
            )
            if not ok
        ]
        if problems:
            raise ConfigError("invalid AIS settings: " + "; ".join(problems))

    def __call__(
        self,
        log_joint: LogJoint,
        x: Tensor,
        proposal: Distribution | None = None,
        generator: torch.Generator | None = None,
        latent_dim: int | None = None,
        return_diagnostics: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            q0 = _resolve_proposal(proposal, log_joint, x, latent_dim)
            step_sizes = self.tune(log_joint, x, q0, generator)
            z0 = sample_proposal(q0, self.n_chains, generator)
            log_w, diagnostics = self.run(log_joint, x, q0, z0, step_sizes, generator=generator)
        log_px = log_mean_exp(log_w, 0)
        if not return_diagnostics:
            return log_px
        stats = _weight_stats(torch.logsumexp(log_w, 0), torch.logsumexp(2 * log_w, 0), self.n_chains)
        return log_px, {**diagnostics, **stats}

    def tune(
        self, log_joint: LogJoint, x: Tensor, q0: Distribution, generator: torch.Generator | None = None
    ) -> Tensor:
        """Per-example step sizes for each transition, (n_steps - 1, 1, batch): from a pilot forward
        run (geometric mean over pilot chains) with `adapt`, else `step_size` throughout."""
        if not self.adapt:
            return torch.full((self.n_steps - 1, 1, x.shape[0]), self.step_size, device=x.device, dtype=x.dtype)
        z0 = sample_proposal(q0, self.pilot_chains, generator)
        _, pilot = self.run(log_joint, x, q0, z0, None, generator=generator)
        return pilot["step_sizes"].log().mean(1, keepdim=True).exp()

    def run(
        self,
        log_joint: LogJoint,
        x: Tensor,
        q0: Distribution,
        z0: Tensor,
        step_sizes: Tensor | None,
        reverse: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One AIS pass from chains z0 (n_chains, batch, d): forward (q0 -> posterior) or `reverse`.

        Returns log weights sum_t [log f_t(z_{t-1}) - log f_{t-1}(z_{t-1})], (n_chains, batch). Each
        increment is taken BEFORE the transition that leaves f_t invariant, which is what makes the
        weights exact; the transition after the last increment would not change them and is skipped.
        `step_sizes` (n_steps - 1, ...) indexed in forward order fixes the kernels; None adapts them
        online from acceptance (pilot runs only) and records them as diagnostics `step_sizes`.
        """
        betas = annealing_schedule(self.n_steps, self.schedule)  # type: ignore[arg-type]
        if reverse:
            betas = betas.flip(0)
            step_sizes = step_sizes.flip(0) if step_sizes is not None else None
        path = _GeometricPath(log_joint, x, q0)
        scale = _proposal_std(q0) if self.precondition else None
        z = z0.detach()
        aux = path.ends(z)
        chain_shape = z.shape[:-1]
        log_w = torch.zeros(chain_shape, device=z.device, dtype=z.dtype)
        eps = torch.full(chain_shape, self.step_size, device=z.device, dtype=z.dtype)
        accept_sum = torch.zeros_like(eps)
        used: list[Tensor] = []
        b = betas.tolist()
        for t in range(1, self.n_steps + 1):
            log_w += (b[t] - b[t - 1]) * (aux[1] - aux[0])
            if t == self.n_steps:
                break
            if step_sizes is not None:
                eps = step_sizes[t - 1].to(z).expand(chain_shape)
            else:
                used.append(eps)
            point, accept = hmc_step(
                path.target(b[t]), path.at(b[t], z, aux), eps, self.leapfrog_steps, scale, generator
            )
            z, aux = point.z, point.aux
            accept_sum += accept
            if step_sizes is None:
                eps = adapt_step_size(eps, accept, self.target_accept, self.adapt_rate)
        if not torch.isfinite(log_w).all():
            bad = int((~torch.isfinite(log_w)).sum())
            raise NumericalError(f"AIS produced {bad} non-finite log weights (check log_joint at the proposal's samples)")
        diagnostics = {
            "log_weights": log_w,
            "accept_rate": accept_sum.mean() / max(self.n_steps - 1, 1),
            "z": z,
        }
        if step_sizes is None:
            diagnostics["step_sizes"] = torch.stack(used) if used else eps.new_empty((0, *chain_shape))
        return log_w, diagnostics


def ais_log_likelihood(
    log_joint: LogJoint,
    x: Tensor,
    n_steps: int = 500,
    n_chains: int = 8,
    init: Distribution | None = None,
    schedule: Schedule = "sigmoid",
    leapfrog_steps: int = 10,
    step_size: float = 0.05,
    target_accept: float = 0.65,
    adapt: bool = True,
    adapt_rate: float = 0.2,
    pilot_chains: int = 1,
    precondition: bool = True,
    latent_dim: int | None = None,
    generator: torch.Generator | None = None,
    return_diagnostics: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """AIS estimate of log p(x), shape (batch,): log-mean-exp over `n_chains` independent AIS runs
    along f_t = q0^(1 - b_t) p(x, z)^b_t (see `AnnealedImportanceSampling` for the settings).

    Always returns `(log_px, diagnostics)`; diagnostics (empty if not `return_diagnostics`):
    `log_weights` (n_chains, batch), per-example `ess` and `log_px_se` (delta method over chains),
    mean `accept_rate`, final chain states `z` (approximate posterior samples).
    """
    settings = AnnealedImportanceSampling(
        n_steps, n_chains, schedule, leapfrog_steps, step_size, target_accept, adapt, adapt_rate, pilot_chains, precondition
    )
    if not return_diagnostics:
        return settings(log_joint, x, init, generator, latent_dim), {}
    return settings(log_joint, x, init, generator, latent_dim, return_diagnostics=True)

# --------------------------------------------------------------------------- BDMC


@dataclass
class BDMCResult:
    """Sandwich of the mean log p(x) over simulated examples; `*_se` are standard errors over examples."""

    lower: float
    upper: float
    gap: float
    lower_se: float
    upper_se: float
    gap_se: float
    log_px_lower: Tensor
    log_px_upper: Tensor
    x: Tensor
    z: Tensor

    def as_dict(self, prefix: str = "bdmc/") -> dict[str, float]:
        keys = ("lower", "upper", "gap", "lower_se", "upper_se", "gap_se")
        return {f"{prefix}{k}": float(getattr(self, k)) for k in keys}


def simulator_from_model(model: torch.nn.Module) -> Simulator:
    """(x, z) ~ p(z) p(x | z) from a `GenerativeModel` (x sampled from the likelihood, not its mean:
    BDMC's upper bound is only valid when z is an exact posterior sample given x)."""

    @torch.no_grad()
    def simulate(n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        z = model.prior.sample(n, generator=generator)
        x = model.likelihood.sample(model.decode(z), generator=generator)
        return x, z

    return simulate


@torch.no_grad()
def bdmc(
    log_joint: LogJoint,
    simulate: Simulator | torch.nn.Module,
    n_examples: int,
    ais: AnnealedImportanceSampling | None = None,
    init: Callable[[Tensor], Distribution] | None = None,
    latent_dim: int | None = None,
    generator: torch.Generator | None = None,
) -> BDMCResult:
    """Bidirectional Monte Carlo on `n_examples` pairs (x, z) simulated from the model.

    Forward AIS (q0 -> p(z|x)) gives E[log w] <= log p(x). Reverse AIS runs the same path backwards
    starting from the exact posterior sample z (it is one, since (x, z) came from the joint); its
    weights estimate Z_q0 / p(x) = 1 / p(x) unbiasedly, so -log-mean-exp of them is a stochastic
    upper bound. The gap upper - lower bounds the AIS error on data like this (Grosse et al. 2015).

    `simulate(n, generator) -> (x, z)` or a `GenerativeModel`; `ais` holds the AIS settings (default
    `AnnealedImportanceSampling(n_chains=1)`, as in the paper); both directions use the same
    pilot-tuned step sizes. `init(x)` optionally gives q0 for x (e.g. an encoder), default N(0, I).
    """
    ais = ais if ais is not None else AnnealedImportanceSampling(n_chains=1)
    if isinstance(simulate, torch.nn.Module):
        latent_dim = latent_dim or getattr(simulate, "latent_dim", None)
        simulate = simulator_from_model(simulate)
    x, z_true = simulate(n_examples, generator)
    q0 = _resolve_proposal(init(x) if init is not None else None, log_joint, x, latent_dim or z_true.shape[-1])
    step_sizes = ais.tune(log_joint, x, q0, generator)
    z0_fwd = sample_proposal(q0, ais.n_chains, generator)
    log_w_fwd, _ = ais.run(log_joint, x, q0, z0_fwd, step_sizes, generator=generator)
    z0_rev = z_true.to(x).unsqueeze(0).expand(ais.n_chains, *z_true.shape)
    log_w_rev, _ = ais.run(log_joint, x, q0, z0_rev, step_sizes, reverse=True, generator=generator)
    lower, upper = log_mean_exp(log_w_fwd, 0), -log_mean_exp(log_w_rev, 0)
    (lo, lo_se), (up, up_se), (gap, gap_se) = mean_and_se(lower), mean_and_se(upper), mean_and_se(upper - lower)
    return BDMCResult(lo, up, gap, lo_se, up_se, gap_se, lower, upper, x, z_true)


# --------------------------------------------------------------------------- metric


class LogLikelihood(Metric):
    """Mean per-example log p(x) reported as `nll` (= -mean, nats, lower is better) and `nll_se`
    (standard error of the mean over examples). States are float64 sums so they reduce across
    processes by summation and do not lose precision at large N."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    sum: Tensor
    sum_sq: Tensor
    count: Tensor

    def __init__(self, **kwargs) -> None:  # noqa: ANN003 - forwarded to torchmetrics.Metric
        super().__init__(**kwargs)
        for name in ("sum", "sum_sq", "count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, log_px: Tensor) -> None:
        log_px = log_px.detach().reshape(-1).to(torch.float64)
        if not torch.isfinite(log_px).all():
            raise NumericalError(f"LogLikelihood got {(~torch.isfinite(log_px)).sum().item()} non-finite log p(x) values")
        self.sum += log_px.sum()
        self.sum_sq += log_px.pow(2).sum()
        self.count += log_px.numel()

    def compute(self) -> dict[str, Tensor]:
        mean = self.sum / self.count
        var = (self.sum_sq - self.count * mean.pow(2)).clamp(min=0.0) / (self.count - 1)
        return {"nll": -mean, "nll_se": (var / self.count).sqrt()}
