"""The posterior contract: what every inference method answers for `posterior(x, index)`.

A method (VAE, AVB, ALMOND, or one you write) returns a `Posterior` for a batch x (batch, D). The
estimators, metrics and callbacks use only this object and the method's `GenerativeModel`; they never
ask which method made it.

A subclass implements (in the style of Pyro's distributions: say `sample` and `log_prob`, nothing else):

- `sample(n, generator) -> (n, batch, d)`: draws of z, every random number from `generator`.   [required]
- `log_prob(z) -> (..., batch)`: the density, where it has one; set `has_density = True`.      [optional]
- `gaussian() -> (mean, log_var)`, each (batch, d), where it is an amortized diagonal Gaussian.  [optional]
- `bound(k, generator) -> (batch,)`: its own lower bound on log p(x) from k draws.             [optional]

It gets `fitted_gaussian(n, generator)` (a moment fit to n draws, which AIS starts from) and
`batch_size`/`latent_dim` from a draw. A method whose posterior is not one of the three shipped here
(`GaussianPosterior`, `SamplePosterior`, `ImplicitPosterior`) subclasses `Posterior` directly.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import Tensor

from latentlab.errors import ConfigError

LOG_2PI = math.log(2.0 * math.pi)
LogLikelihood = Callable[[Tensor], Tensor]  # z (..., batch, d) -> log p(x | z) (..., batch), x bound inside
BoundFn = Callable[[int, "torch.Generator | None"], Tensor]


def moment_fit(draws: Tensor, min_std: float = 1e-3) -> tuple[Tensor, Tensor]:
    """(mean, log_var) (batch, d) of the diagonal Gaussian with the moments of draws (n >= 2, batch, d).

    The one moment fit of the project: AIS starts, ALMOND's and AVB's Gaussian summaries, the fitted-ELBO
    bound. No inflation here; a caller that needs a wider proposal says so with `std_inflation` below.
    """
    if draws.dim() != 3 or draws.shape[0] < 2:
        raise ConfigError(f"posterior draws must be (n >= 2, batch, d), got {tuple(draws.shape)}")
    draws = draws.detach()
    return draws.mean(0), draws.var(0).clamp(min=min_std**2).log()


def gaussian_kl_to_standard_normal(mean: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mean, diag exp(log_var)) || N(0, I)) summed over the last dim, in closed form."""
    return 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).sum(-1)


def gaussian_log_prob(z: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log N(z; mean, diag exp(log_var)) summed over the last dim; z (..., batch, d)."""
    return -0.5 * (((z - mean) ** 2) * torch.exp(-log_var) + log_var + LOG_2PI).sum(-1)


class Posterior(ABC):
    """An approximate posterior over z for one batch of x. See the module docstring for the contract."""

    has_density: bool = False

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws per example, (n, batch, d)."""

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z | x) for z (..., batch, d); only where `has_density`."""
        raise NotImplementedError(f"{type(self).__name__} has no density (has_density is False)")

    def gaussian(self) -> tuple[Tensor, Tensor] | None:
        """(mean, log_var) of an amortized diagonal Gaussian q(z|x), or None if the posterior is not one."""
        return None

    def bound(self, k: int, generator: torch.Generator | None = None) -> Tensor | None:
        """The method's own per-example lower bound on log p(x) from k draws, or None without one."""
        return None

    def fitted_gaussian(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(mean, log_var) of the Gaussian itself when it is one, else a moment fit to n draws."""
        own = self.gaussian()
        return own if own is not None else moment_fit(self.sample(max(2, n), generator))


def reparameterized(mean: Tensor, log_var: Tensor, n: int | None, generator: torch.Generator | None = None) -> Tensor:
    """mean + std * eps with eps from `generator`: (n, batch, d), or (batch, d) when n is None.

    The one reparameterised draw of the project; gradients flow to mean and log_var.
    """
    shape = mean.shape if n is None else (n, *mean.shape)
    eps = torch.randn(shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + torch.exp(0.5 * log_var) * eps


class GaussianPosterior(Posterior):
    """q(z|x) = N(mean, diag exp(log_var)): a density, an amortized Gaussian and the exact-KL ELBO.

    `log_likelihood(z)` is log p(x | z) with x bound (the method passes `partial(model.log_likelihood, x)`);
    without it there is no bound. The prior is N(0, I), so the KL is in closed form.
    """

    has_density = True

    def __init__(self, mean: Tensor, log_var: Tensor, log_likelihood: LogLikelihood | None = None,
                 chunk_size: int = 100) -> None:
        self.mean, self.log_var, self.log_likelihood, self.chunk_size = mean, log_var, log_likelihood, int(chunk_size)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return reparameterized(self.mean, self.log_var, n, generator)

    def log_prob(self, z: Tensor) -> Tensor:
        return gaussian_log_prob(z, self.mean, self.log_var)

    def gaussian(self) -> tuple[Tensor, Tensor]:
        return self.mean, self.log_var

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per example, (batch,)."""
        return gaussian_kl_to_standard_normal(self.mean, self.log_var)

    def bound(self, k: int, generator: torch.Generator | None = None) -> Tensor | None:
        """(1/k) sum_i log p(x | z_i) - KL(q || p), z_i ~ q, `chunk_size` draws at a time."""
        if self.log_likelihood is None:
            return None
        recon = torch.zeros_like(self.mean[..., 0])
        for start in range(0, k, self.chunk_size):
            recon = recon + self.log_likelihood(self.sample(min(self.chunk_size, k - start), generator)).sum(0)
        return recon / k - self.kl()


class SamplePosterior(Posterior):
    """A posterior known only by a sampler (ALMOND's Langevin chains): `draw(n, generator) -> (n, batch, d)`.

    Its bound is the ELBO of the Gaussian moment-fitted to `fit_draws` of its draws, E_q[log p(x, z)] + H(q):
    a true lower bound on log p(x), and log p(x) minus it says how well a Gaussian summarises the samples.
    """

    def __init__(self, draw: Callable[[int, "torch.Generator | None"], Tensor],
                 log_joint: LogLikelihood | None = None, fit_draws: int = 16) -> None:
        self._draw, self.log_joint, self.fit_draws = draw, log_joint, int(fit_draws)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self._draw(n, generator)

    def bound(self, k: int, generator: torch.Generator | None = None) -> Tensor | None:
        if self.log_joint is None:
            return None
        mean, log_var = self.fitted_gaussian(self.fit_draws, generator)
        return gaussian_elbo(self.log_joint, mean, log_var, k, generator)


class ImplicitPosterior(Posterior):
    """Noise in, z out, no density (AVB): draws from `draw`, the bound from `bound_fn` when given."""

    def __init__(self, draw: Callable[[int, "torch.Generator | None"], Tensor], bound_fn: BoundFn | None = None) -> None:
        self._draw, self._bound = draw, bound_fn

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self._draw(n, generator)

    def bound(self, k: int, generator: torch.Generator | None = None) -> Tensor | None:
        return None if self._bound is None else self._bound(k, generator)


def gaussian_elbo(log_joint: LogLikelihood, mean: Tensor, log_var: Tensor, k: int = 100,
                  generator: torch.Generator | None = None, chunk_size: int = 100) -> Tensor:
    """E_q[log p(x, z) - log q(z)] (batch,) for q = N(mean, diag exp(log_var)), by k reparameterised draws.

    `log_joint(z)` is log p(x, z) with x bound. The sampled log q (not the analytic entropy) makes the
    estimate exact with any k when q is the posterior, so a vanishing approximation gap is measurable.
    """
    if k < 1:
        raise ConfigError(f"gaussian_elbo needs k >= 1, got {k}")
    total = torch.zeros_like(mean[..., 0])
    for start in range(0, k, chunk_size):
        z = reparameterized(mean, log_var, min(chunk_size, k - start), generator)
        total = total + (log_joint(z) - gaussian_log_prob(z, mean, log_var)).sum(0)
    return total / k
