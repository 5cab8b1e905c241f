"""Observation models p(x | params): each says `log_prob` (summed over data dims) and `sample`.

The decoder outputs raw parameters; a likelihood turns them into a density. Keeping the two apart
lets every inference method and evaluator treat "decoder + likelihood" as one `log p(x | z)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_2PI = math.log(2.0 * math.pi)


class Likelihood(nn.Module):
    """p(x | params). `param_multiplier` says how many decoder outputs one data dim needs."""

    param_multiplier: int = 1

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """log p(x | params) summed over all but the leading batch dims of `x`."""
        raise NotImplementedError

    def pairwise_log_prob(self, x: Tensor, params: Tensor, max_elements: int = 2**24) -> Tensor:
        """log p(x_b | params_g) for every (g, b): (G, B) from x (B, D) and params (G, P), e.g. a quadrature grid.
        This default broadcasts in chunks of g (chunk x B x D below `max_elements`); the built-in likelihoods
        override it with one float64 matrix product."""
        chunk = max(1, max_elements // max(1, x.shape[0] * params.shape[-1]))
        return torch.cat([self.log_prob(x, params[i: i + chunk, None, :].expand(-1, x.shape[0], -1))
                          for i in range(0, params.shape[0], chunk)], 0)

    def param_score(self, x: Tensor, params: Tensor) -> Tensor | None:
        """d log p(x | params) / d params in closed form, shaped like params (x broadcast against it), or None
        where there is none (callers then differentiate `log_prob`). A Langevin move needs only this gradient,
        and for images computing it skips the log-density's own forward over every pixel."""
        return None

    def mean(self, params: Tensor) -> Tensor:
        """E[x | params], used for reconstructions and sample grids."""
        raise NotImplementedError

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError


class BernoulliLikelihood(Likelihood):
    """Bernoulli with logits; x may be binary or in [0, 1] (the usual 'continuous Bernoulli-free' trick)."""

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        # -BCE with logits is log p stably for any logit magnitude.
        if x.shape != params.shape:  # the common equal-shape case skips the broadcast (hot path)
            x, params = torch.broadcast_tensors(x, params)
        return -F.binary_cross_entropy_with_logits(params, x, reduction="none").sum(-1)

    def pairwise_log_prob(self, x: Tensor, params: Tensor, max_elements: int = 2**24) -> Tensor:
        # log p = sum_d x_d l_d - softplus(l_d) (also for x in [0, 1]): one (G, D) x (D, B) product
        logits = params.double()
        return (logits @ x.double().T - F.softplus(logits).sum(-1, keepdim=True)).to(params.dtype)

    def param_score(self, x: Tensor, params: Tensor) -> Tensor:
        return x - torch.sigmoid(params)  # d/dl [x l - softplus(l)]

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(params), generator=generator)


class GaussianLikelihood(Likelihood):
    """Diagonal Gaussian. `learn_variance`: per-dimension log-variance is a learned parameter
    (`per_sample=False`) or predicted by the decoder (`per_sample=True`, decoder emits 2x outputs)."""

    def __init__(
        self,
        data_dim: int,
        variance: float = 1.0,
        learn_variance: bool = False,
        per_sample: bool = False,
        min_log_var: float = -10.0,
    ) -> None:
        super().__init__()
        if variance <= 0:
            raise ValueError(f"GaussianLikelihood variance must be > 0, got {variance}")
        self.per_sample = bool(learn_variance and per_sample)
        self.param_multiplier = 2 if self.per_sample else 1
        self.min_log_var = min_log_var
        log_var = torch.full((data_dim,), math.log(variance))
        if learn_variance and not per_sample:
            self.log_var = nn.Parameter(log_var)
        else:
            self.register_buffer("log_var", log_var)

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        if self.per_sample:
            mu, log_var = params.chunk(2, dim=-1)
        else:
            mu, log_var = params, self.log_var.expand_as(params)
        return mu, log_var.clamp(min=self.min_log_var)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        mu, log_var = self._split(params)
        return -0.5 * (LOG_2PI + log_var + (x - mu).pow(2) * torch.exp(-log_var)).sum(-1)

    def pairwise_log_prob(self, x: Tensor, params: Tensor, max_elements: int = 2**24) -> Tensor:
        # (x - mu)^2 / var expanded: three (G, D) x (D, B) products instead of a (G, B, D) tensor
        mu, log_var = (t.double() for t in self._split(params))
        precision, x = torch.exp(-log_var), x.double()
        quad = precision @ (x * x).T - 2.0 * (mu * precision) @ x.T + (mu * mu * precision).sum(-1, keepdim=True)
        return (-0.5 * (quad + (LOG_2PI + log_var).sum(-1, keepdim=True))).to(params.dtype)

    def param_score(self, x: Tensor, params: Tensor) -> Tensor:
        """(x - mu) / var in mu; with per-sample variances also ((x - mu)^2 / var - 1) / 2 in the log-variance (0
        where it is clamped at min_log_var)."""
        mu, log_var = self._split(params)
        scaled = (x - mu) * torch.exp(-log_var)
        if not self.per_sample:
            return scaled
        raw = params.chunk(2, dim=-1)[1]
        return torch.cat([scaled, torch.where(raw >= self.min_log_var, 0.5 * (scaled * (x - mu) - 1.0), 0.0)], -1)

    def mean(self, params: Tensor) -> Tensor:
        return self._split(params)[0]

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mu, log_var = self._split(params)
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * log_var) * noise
