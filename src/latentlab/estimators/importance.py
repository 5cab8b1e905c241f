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
from latentlab.posterior import Posterior, gaussian_log_prob, moment_fit, reparameterized


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


class DrawMixture(Posterior):
    """An IS proposal for a posterior known only by draws (AVB's implicit q, ALMOND's chains): a Gaussian kernel
    density estimate over J draws (bandwidth `bandwidth` x the draws' std, per dimension), the moment-fitted
    Gaussian with std x `inflation`, and the prior N(0, I), weighted (1 - w) / 2, (1 - w) / 2 and w = `prior_weight`.

    Why not AIS from the fitted Gaussian: when the draws sit in several modes (2-d MNIST posteriors often have two),
    a handful of HMC chains started from one Gaussian settle in one mode and miss the others' mass, while the kernel
    estimate puts proposal mass in every mode a draw found; the wide Gaussian covers their surroundings and the prior
    the modes no chain found (p / q <= p / (w prior)). The draws only build the proposal: the IS draws are fresh,
    so the estimate stays unbiased for p(x). 2-d ALMOND on MNIST (2 epochs, 55k; 300 test images vs quadrature):
    AIS 500x4 +0.98 nats, this without the prior part +0.36, with it +0.21."""

    has_density = True

    def __init__(self, draws: Tensor, bandwidth: float, inflation: float, prior_weight: float = 1.0 / 3.0,
                 min_std: float = 1e-3) -> None:
        if not bandwidth > 0:
            raise ConfigError(f"eval.nll.kde_bandwidth must be > 0, got {bandwidth!r}")
        if not 0.0 <= prior_weight < 1.0:
            raise ConfigError(f"the prior's weight in the draw mixture must be in [0, 1), got {prior_weight!r}")
        self.centres = draws.detach()  # (J, batch, d)
        self.mean, log_var = moment_fit(self.centres, min_std)
        self.kernel_std = torch.exp(0.5 * log_var) * bandwidth  # (batch, d)
        self.wide = log_var + 2.0 * math.log(max(inflation, 1.0))
        self.log_w = torch.tensor([(1.0 - prior_weight) / 2, (1.0 - prior_weight) / 2, prior_weight]).log()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        J, batch, d = self.centres.shape
        device, dtype = self.centres.device, self.centres.dtype
        pick_centre = torch.randint(0, J, (n, batch), generator=generator, device=device)
        centres = torch.gather(self.centres, 0, pick_centre[..., None].expand(n, batch, d))
        kde = centres + self.kernel_std * torch.randn(centres.shape, generator=generator, device=device, dtype=dtype)
        wide = reparameterized(self.mean, self.wide, n, generator)
        prior = torch.randn(kde.shape, generator=generator, device=device, dtype=dtype)
        u = torch.rand((n, batch, 1), generator=generator, device=device, dtype=dtype)
        cut = self.log_w.exp().cumsum(0).to(device=device, dtype=dtype)
        return torch.where(u < cut[0], kde, torch.where(u < cut[1], wide, prior))

    def log_prob(self, z: Tensor) -> Tensor:
        # per example b: squared distances of its n points to its J centres in kernel units, (batch, n, J)
        dist2 = torch.cdist((z / self.kernel_std).transpose(0, 1), (self.centres / self.kernel_std).transpose(0, 1)).square()
        log_norm = -torch.log(self.kernel_std).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)  # (batch,)
        kde = (torch.logsumexp(-0.5 * dist2, -1) + log_norm[:, None]).transpose(0, 1) - math.log(self.centres.shape[0])
        prior = -0.5 * (z.square().sum(-1) + z.shape[-1] * math.log(2 * math.pi))
        parts = torch.stack([kde, gaussian_log_prob(z, self.mean, self.wide), prior]) + self.log_w.to(z).view(3, 1, 1)
        return torch.logsumexp(parts, 0)


class EqualMixture(Posterior):
    """The proposal 1/2 a + 1/2 b: p / mixture <= 2 p / a, so adding b never costs more than a factor 2 of weight."""

    has_density = True

    def __init__(self, a: Posterior, b: Posterior) -> None:
        self.a, self.b = a, b

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        za, zb = self.a.sample(n, generator), self.b.sample(n, generator)
        pick = torch.rand(za.shape[:-1], generator=generator, device=za.device, dtype=za.dtype) < 0.5
        return torch.where(pick[..., None], zb, za)

    def log_prob(self, z: Tensor) -> Tensor:
        return torch.logaddexp(self.a.log_prob(z), self.b.log_prob(z)) - math.log(2.0)


@torch.no_grad()
def refine_proposal(log_joint: LogJoint, x: Tensor, proposal: Posterior, pilot: int, draws: int, bandwidth: float,
                    inflation: float, chunk_size: int = 250, generator: torch.Generator | None = None) -> Posterior:
    """One round of adaptive importance sampling (population Monte Carlo, Cappe et al. 2004): `pilot` draws from
    `proposal` are weighted by p(x, z) / proposal(z), `draws` of them resampled by weight become the centres of a
    new `DrawMixture`, and the proposal becomes 1/2 proposal + 1/2 that mixture. The pilot's prior and wide parts
    find posterior modes no chain reached, and the resampled centres sit where the posterior's mass is, at its own
    scale. The IS estimate then uses fresh draws, so it stays an unbiased estimate of p(x). 2-d ALMOND on MNIST
    (6 epochs, 55k; 300 test images vs quadrature): +0.74 nats from the chains' draws alone, +0.25 after one round
    of 1000 pilot draws, +0.17 after two."""
    zs, log_ws = [], []
    for start in range(0, pilot, chunk_size):
        z = proposal.sample(min(chunk_size, pilot - start), generator)
        zs.append(z)
        log_ws.append(log_joint(x, z) - proposal.log_prob(z))
    z, log_w = torch.cat(zs), torch.cat(log_ws)  # (pilot, batch, d), (pilot, batch)
    log_w = torch.nan_to_num(log_w, nan=-math.inf, posinf=-math.inf)
    log_w = torch.where(torch.isfinite(log_w).any(0), log_w, 0.0)  # no finite weight: resample uniformly
    picks = torch.multinomial(torch.softmax(log_w.T, -1), draws, replacement=True, generator=generator)  # (batch, J)
    centres = torch.gather(z.transpose(0, 1), 1, picks[..., None].expand(-1, -1, z.shape[-1])).transpose(0, 1)
    return EqualMixture(proposal, DrawMixture(centres, bandwidth, inflation))


def is_proposal(posterior: Posterior, inflation: float, draws: int = 64, bandwidth: float = 0.2,
                generator: torch.Generator | None = None) -> Posterior:
    """The IS proposal for a posterior: itself, or the defensive mixture around its Gaussian when inflation > 1;
    for a posterior without a density, the `DrawMixture` of `draws` of its draws."""
    if not posterior.has_density:
        return DrawMixture(posterior.sample(max(2, draws), generator), bandwidth, inflation)
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
        raise ConfigError(f"importance sampling needs a proposal with a density; {type(posterior).__name__} has none "
                          "(latentlab.estimators.importance.is_proposal builds one from its draws)")
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
