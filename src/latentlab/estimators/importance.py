"""Importance sampling: log p(x) ~= log (1/k) sum_i p(x, z_i) / q(z_i), z_i ~ q(z | x).

A stochastic lower bound (Jensen) that tightens with k (Burda et al. 2016). Draws are folded `chunk_size`
at a time into running log-sum-exps, so memory is O(chunk_size x batch) whatever k is; the estimate at
k/2 comes for free and is the convergence diagnostic (a converged estimate barely moves from k/2 to k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from latentlab.errors import ConfigError
from latentlab.estimators.common import LogJoint, weight_stats
from latentlab.generative import GenerativeModel
from latentlab.posterior import Posterior, gaussian_log_prob, reparameterized


class DefensiveGaussian(Posterior):
    """Defensive importance sampling (Hesterberg 1995): the mixture 1/2 q + 1/2 q_wide of an amortized Gaussian q
    and q with its std times `inflation`. Encoders fit q by KL(q || p), so q is narrower than p(z|x) and plain IS
    weights are heavy-tailed; the wide half covers the tails, and p/mixture <= 2 p/q, so it is never much worse."""

    has_density = True

    def __init__(self, mean: Tensor, log_var: Tensor, inflation: float) -> None:
        self.mean, self.log_var, self.wide = mean, log_var, log_var + 2.0 * math.log(inflation)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        narrow, wide = reparameterized(self.mean, self.log_var, n, generator), reparameterized(self.mean, self.wide, n, generator)
        pick = torch.rand(narrow.shape[:-1], generator=generator, device=narrow.device, dtype=narrow.dtype) < 0.5
        return torch.where(pick[..., None], wide, narrow)

    def log_prob(self, z: Tensor) -> Tensor:
        both = torch.stack([gaussian_log_prob(z, self.mean, self.log_var), gaussian_log_prob(z, self.mean, self.wide)])
        return torch.logsumexp(both, 0) - math.log(2.0)


def is_proposal(posterior: Posterior, inflation: float) -> Posterior:
    """The IS proposal for a posterior: itself, or the defensive mixture around its Gaussian when inflation > 1."""
    gaussian = posterior.gaussian()
    return posterior if inflation <= 1.0 or gaussian is None else DefensiveGaussian(*gaussian, inflation)


@dataclass
class ISResult:
    """Per-example estimates (batch,): at the full budget k, at k // 2, and the weights' ESS and delta-method SE."""

    log_px: Tensor
    log_px_half: Tensor
    ess: Tensor
    log_px_se: Tensor


@torch.no_grad()
def importance_sampling(log_joint: LogJoint, x: Tensor, posterior: Posterior, k: int, chunk_size: int = 100,
                        generator: torch.Generator | None = None) -> ISResult:
    """IS with the posterior as proposal (it must have a density); `log_joint(x, z)` is the model's."""
    if k < 1 or chunk_size < 1:
        raise ConfigError(f"importance sampling needs k >= 1 and chunk_size >= 1, got k={k}, chunk_size={chunk_size}")
    if not posterior.has_density:
        raise ConfigError(f"importance sampling needs a proposal with a density; {type(posterior).__name__} has none")
    half = max(1, k // 2)
    lse = torch.full(x.shape[:1], -torch.inf, device=x.device, dtype=x.dtype)
    lse2, lse_half = lse.clone(), lse.clone()
    done = 0
    for target in (half, k):  # the first k // 2 draws, recorded, then the rest
        while done < target:
            n = min(chunk_size, target - done)
            z = posterior.sample(n, generator)
            log_w = log_joint(x, z) - posterior.log_prob(z)
            lse = torch.logaddexp(lse, torch.logsumexp(log_w, 0))
            lse2 = torch.logaddexp(lse2, torch.logsumexp(2 * log_w, 0))
            done += n
        if target == half:
            lse_half = lse.clone()
    stats = weight_stats(lse, lse2, k)
    return ISResult(lse - math.log(k), lse_half - math.log(half), stats["ess"], stats["log_px_se"])


def importance_sampling_log_px(model: GenerativeModel, x: Tensor, posterior: Posterior, k: int,
                               chunk_size: int = 100, generator: torch.Generator | None = None) -> Tensor:
    """log p(x) (batch,) by IS with `posterior` as the proposal."""
    return importance_sampling(model.log_joint, x, posterior, k, chunk_size, generator).log_px
