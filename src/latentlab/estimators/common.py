"""Small numerical helpers every estimator shares (no model, no method, no Lightning)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal

from latentlab.rng import seeded_global_rng

LogJoint = Callable[[Tensor, Tensor], Tensor]  # (x (batch, D), z (..., batch, d)) -> (..., batch)


def log_mean_exp(t: Tensor, dim: int = 0, keepdim: bool = False) -> Tensor:
    """log(mean(exp(t))) along `dim` without overflow (logsumexp shifts by the max)."""
    return torch.logsumexp(t, dim=dim, keepdim=keepdim) - math.log(t.shape[dim])


def mean_and_se(t: Tensor) -> tuple[float, float]:
    """Mean over examples and its standard error std / sqrt(n) (nan for a single example)."""
    n = t.numel()
    return float(t.mean()), float(t.std() / math.sqrt(n)) if n > 1 else float("nan")


def weight_stats(lse: Tensor, lse2: Tensor, k: int) -> dict[str, Tensor]:
    """From log sum w and log sum w^2 over k weights: effective sample size (sum w)^2 / sum w^2 and the
    delta-method standard error of log mean(w), sqrt(1/ESS - 1/k). Optimistic for heavy-tailed weights."""
    ess = torch.exp(2 * lse - lse2)
    return {"ess": ess, "log_px_se": (1.0 / ess - 1.0 / k).clamp(min=0.0).sqrt()}


def diagonal_gaussian(mean: Tensor, log_var: Tensor) -> Distribution:
    """N(mean, diag exp(log_var)) with batch_shape (batch,): AIS's q0."""
    return Independent(Normal(mean, torch.exp(0.5 * log_var)), 1)


def standard_normal(batch: int, latent_dim: int, like: Tensor) -> Distribution:
    """The prior N(0, I) with batch_shape (batch,), on `like`'s device and dtype."""
    zeros = torch.zeros(batch, latent_dim, device=like.device, dtype=like.dtype)
    return Independent(Normal(zeros, torch.ones_like(zeros)), 1)


def normal_parts(dist: Distribution) -> tuple[Tensor, Tensor] | None:
    """(loc, scale) of an Independent(Normal) / Normal, so we can draw with our own generator."""
    base = dist.base_dist if isinstance(dist, Independent) else dist
    return (base.loc, base.scale) if isinstance(base, Normal) else None


def sample_distribution(dist: Distribution, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n draws (n, *batch_shape, *event_shape) reproducible through `generator`.

    torch.distributions' `.sample` takes no generator, so Normal families are drawn as loc + scale * eps;
    anything else is sampled under a forked global RNG seeded from `generator` (global state untouched).
    """
    shape = torch.Size((n,)) + dist.batch_shape + dist.event_shape
    parts = normal_parts(dist)
    if parts is not None:
        loc, scale = parts
        return loc + scale * torch.randn(shape, generator=generator, device=loc.device, dtype=loc.dtype)
    if generator is None:
        return dist.sample((n,))
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with seeded_global_rng(seed, generator.device):
        return dist.sample((n,))
