"""Hamiltonian Monte Carlo transitions (Neal 2011, "MCMC using Hamiltonian dynamics").

AIS and BDMC need, at every intermediate distribution, a Markov transition that leaves that
distribution invariant and mixes quickly in a continuous latent space; HMC with a Metropolis
correction is exactly invariant, which keeps AIS weights exact (the sampler's discretisation error
shows up as rejections, never as bias). Everything is vectorised over any leading shape of z,
typically (n_chains, batch, d), so one call moves every chain of every example at once.

The target is a function `z -> Point` (log-density, its gradient w.r.t. z and optional auxiliary
tensors the caller wants carried along, e.g. the two ends of an AIS path). Gradients are taken
w.r.t. z only: model parameters never receive `.grad`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from latentlab.samplers.langevin import value_and_grad  # one gradient-w.r.t.-z helper for every sampler


@dataclass
class Point:
    """A state of the chain with everything a transition needs at it.

    `log_prob` has shape z.shape[:-1]; `grad` has z's shape; each `aux` tensor is shaped like
    either of them and is selected together with z on accept/reject.
    """

    z: Tensor
    log_prob: Tensor
    grad: Tensor
    aux: tuple[Tensor, ...] = field(default_factory=tuple)


Target = Callable[[Tensor], Point]


def point_from_log_prob(log_prob: Callable[[Tensor], Tensor]) -> Target:
    """Wrap a plain log-density `z -> (...)` as a `Target`."""

    def target(z: Tensor) -> Point:
        lp, grad = value_and_grad(log_prob, z)
        return Point(z.detach(), lp, grad)

    return target


def _select(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """Per-chain choice between two tensors whose leading dims are the chain dims of `mask`."""
    while mask.dim() < new.dim():
        mask = mask.unsqueeze(-1)
    return torch.where(mask, new, old)


def leapfrog(target: Target, point: Point, momentum: Tensor, step: Tensor, n_steps: int) -> tuple[Point, Tensor]:
    """`n_steps` leapfrog steps of size `step` (broadcastable to z, per chain and per dim).

    A per-dimension step `eps * scale` is plain HMC in the coordinates u = z / scale with unit
    mass, so it is still volume-preserving and reversible; it lets a proposal's std act as a
    diagonal preconditioner. Costs `n_steps` target evaluations; the gradient at the start point is
    reused from `point`.
    """
    p = momentum + 0.5 * step * point.grad
    z = point.z
    for i in range(n_steps):
        z = z + step * p
        point = target(z)
        p = p + (0.5 if i == n_steps - 1 else 1.0) * step * point.grad
    return point, p


def hmc_step(
    target: Target,
    point: Point,
    step_size: Tensor,
    n_leapfrog: int,
    scale: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Point, Tensor]:
    """One HMC transition with a Metropolis correction; returns (new point, acceptance probability).

    `step_size` has shape z.shape[:-1] (one per chain) or is broadcastable to it. Proposals with a
    non-finite log-density or energy are rejected, so a chain never moves to NaN.
    """
    z = point.z
    step = step_size.unsqueeze(-1) if step_size.dim() > 0 else step_size
    if scale is not None:
        step = step * scale
    momentum = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    proposal, p_end = leapfrog(target, point, momentum, step, n_leapfrog)
    log_ratio = (proposal.log_prob - 0.5 * p_end.pow(2).sum(-1)) - (point.log_prob - 0.5 * momentum.pow(2).sum(-1))
    log_ratio = torch.nan_to_num(log_ratio, nan=-torch.inf, posinf=-torch.inf)
    accept_prob = log_ratio.clamp(max=0.0).exp()
    u = torch.rand(log_ratio.shape, generator=generator, device=z.device, dtype=z.dtype)
    accepted = u < accept_prob
    new = Point(
        _select(accepted, proposal.z, point.z),
        _select(accepted, proposal.log_prob, point.log_prob),
        _select(accepted, proposal.grad, point.grad),
        tuple(_select(accepted, a_new, a_old) for a_new, a_old in zip(proposal.aux, point.aux, strict=True)),
    )
    return new, accept_prob


def adapt_step_size(
    step_size: Tensor,
    accept_prob: Tensor,
    target_accept: float = 0.65,
    rate: float = 0.2,
    bounds: tuple[float, float] = (1e-6, 10.0),
) -> Tensor:
    """Stochastic-approximation update of log step size toward a target acceptance probability.

    Uses the Metropolis acceptance probability rather than the 0/1 decision (less noisy). 0.65 is
    the optimal HMC acceptance rate in high dimension (Beskos et al. 2013; Neal 2011).
    """
    return (step_size * torch.exp(rate * (accept_prob - target_accept))).clamp(*bounds)


class HMC:
    """HMC sampler for a plain log-density with per-chain step sizes adapted during sampling.

    Adaptation makes the chain non-Markov; use it for burn-in or where a tiny adaptation bias is
    acceptable (as in AIS evaluations of decoder models, Wu et al. 2017), or set `adapt=False`.
    """

    def __init__(
        self,
        step_size: float = 0.1,
        n_leapfrog: int = 10,
        target_accept: float = 0.65,
        adapt: bool = True,
        adapt_rate: float = 0.2,
    ) -> None:
        if step_size <= 0 or n_leapfrog < 1 or not 0.0 < target_accept < 1.0:
            raise ValueError(
                f"HMC needs step_size > 0, n_leapfrog >= 1 and 0 < target_accept < 1; "
                f"got {step_size}, {n_leapfrog}, {target_accept}"
            )
        self.step_size = step_size
        self.n_leapfrog = n_leapfrog
        self.target_accept = target_accept
        self.adapt = adapt
        self.adapt_rate = adapt_rate

    def sample(
        self,
        log_prob: Callable[[Tensor], Tensor],
        z0: Tensor,
        n_steps: int,
        generator: torch.Generator | None = None,
        step_size: Tensor | None = None,
        keep_samples: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Run `n_steps` transitions from `z0`; returns the final z and diagnostics
        (`accept_rate` per chain, final per-chain `step_size`, and `samples` if `keep_samples`)."""
        target = point_from_log_prob(log_prob)
        point = target(z0)
        eps = (
            torch.full(z0.shape[:-1], self.step_size, device=z0.device, dtype=z0.dtype)
            if step_size is None
            else step_size.to(z0).expand(z0.shape[:-1]).clone()
        )
        accept_sum = torch.zeros_like(eps)
        kept = []
        for _ in range(n_steps):
            point, accept = hmc_step(target, point, eps, self.n_leapfrog, generator=generator)
            accept_sum += accept
            if self.adapt:
                eps = adapt_step_size(eps, accept, self.target_accept, self.adapt_rate)
            if keep_samples:
                kept.append(point.z)
        diagnostics = {"accept_rate": accept_sum / max(n_steps, 1), "step_size": eps}
        if keep_samples:
            diagnostics["samples"] = torch.stack(kept)
        return point.z, diagnostics
