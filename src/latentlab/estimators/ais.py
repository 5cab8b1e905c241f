"""Annealed importance sampling (AIS, Neal 2001) along f_t(z) = q0(z)^(1 - b_t) p(x, z)^(b_t), HMC transitions.

A stochastic lower bound on log p(x). `ais_log_px(model, x, posterior, settings)` is the protocol's AIS: q0 is
the Gaussian fitted to the method's posterior draws (or the prior), the budget from `NLLSettings`; the estimate
from half the chains is its convergence diagnostic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor
from torch.distributions import Distribution

from latentlab.errors import ConfigError, NumericalError
from latentlab.estimators.common import (LogJoint, diagonal_gaussian, log_mean_exp, normal_parts, sample_distribution,
                                         standard_normal, weight_stats)
from latentlab.estimators.settings import NLLSettings
from latentlab.generative import GenerativeModel
from latentlab.posterior import Posterior
from latentlab.samplers.hmc import Point, adapt_step_size, hmc_step

Schedule = Literal["sigmoid", "linear"]


def _proposal_std(dist: Distribution) -> Tensor | None:
    """Per-dimension std of a Gaussian q0 (preconditions HMC), else None."""
    parts = normal_parts(dist)
    return None if parts is None else parts[1].expand(dist.batch_shape + dist.event_shape)


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
    """AIS with HMC transitions: the algorithm (its tuning defaults live here, once) and the runner.

    The budget (`n_steps`, `n_chains`, `leapfrog_steps`) has no default: it comes from `NLLSettings`
    (conf/eval/nll/). Called as `(log_joint, x, q0, generator)`; `q0` is a Distribution with batch_shape
    (batch,), the prior or a Gaussian fitted to the method's posterior (far fewer steps needed).

    Step sizes are per example and per intermediate distribution. With `adapt`, they are tuned
    toward `target_accept` on a separate pilot run of `pilot_chains` chains and then frozen for the
    real run: adapting a chain's step size from its own past acceptances makes its kernels depend
    on its history, which biases the AIS weights upwards (measurably so on a linear-Gaussian
    model); kernels fixed by an independent pilot keep every weight exactly unbiased, for about
    pilot_chains / n_chains extra cost. With `precondition`, a Gaussian q0's std scales the step
    per dimension (as in the AVB paper's AIS code).
    """

    n_steps: int
    n_chains: int
    leapfrog_steps: int
    schedule: str = "sigmoid"
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
        q0: Distribution,
        generator: torch.Generator | None = None,
        return_diagnostics: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            step_sizes = self.tune(log_joint, x, q0, generator)
            z0 = sample_distribution(q0, self.n_chains, generator)
            log_w, diagnostics = self.run(log_joint, x, q0, z0, step_sizes, generator=generator)
        log_px = log_mean_exp(log_w, 0)
        if not return_diagnostics:
            return log_px
        stats = weight_stats(torch.logsumexp(log_w, 0), torch.logsumexp(2 * log_w, 0), self.n_chains)
        return log_px, {**diagnostics, **stats}

    def tune(
        self, log_joint: LogJoint, x: Tensor, q0: Distribution, generator: torch.Generator | None = None
    ) -> Tensor:
        """Per-example step sizes for each transition, (n_steps - 1, 1, batch): from a pilot forward
        run (geometric mean over pilot chains) with `adapt`, else `step_size` throughout."""
        if not self.adapt:
            return torch.full((self.n_steps - 1, 1, x.shape[0]), self.step_size, device=x.device, dtype=x.dtype)
        z0 = sample_distribution(q0, self.pilot_chains, generator)
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


def ais_from_settings(settings: NLLSettings, n_chains: int | None = None) -> AnnealedImportanceSampling:
    """The AIS runner with the budget of `settings` (optionally another number of chains, e.g. 1 for BDMC)."""
    return AnnealedImportanceSampling(settings.ais_steps, n_chains or settings.ais_chains, settings.ais_leapfrog)


@torch.no_grad()
def ais_start(model: GenerativeModel, x: Tensor, posterior: Posterior | None, settings: NLLSettings,
              generator: torch.Generator | None = None) -> Distribution:
    """q0: the Gaussian of (or fitted to `fit_draws` draws of) the posterior, or the prior N(0, I)."""
    if posterior is None or settings.ais_start == "prior":
        return standard_normal(x.shape[0], model.latent_dim, x)
    mean, log_var = posterior.fitted_gaussian(settings.fit_draws, generator)
    return diagonal_gaussian(mean.detach().to(x), log_var.detach().to(x))


def ais_log_weights(model: GenerativeModel, x: Tensor, posterior: Posterior | None, settings: NLLSettings,
                    generator: torch.Generator | None = None) -> Tensor:
    """AIS log weights (n_chains, batch) from the protocol's start; log-mean-exp over chains is log p(x)."""
    q0 = ais_start(model, x, posterior, settings, generator)
    _, diagnostics = ais_from_settings(settings)(model.log_joint, x, q0, generator, return_diagnostics=True)
    return diagnostics["log_weights"]
