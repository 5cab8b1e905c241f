"""A Gaussian mixture with every density, score and denoiser in closed form, and the ring toy built on it.

`GaussianMixture` is the ground truth of the score tests: for x ~ sum_k w_k N(mu_k, s_k^2 I) and
y = x + sigma * N(0, I), the noised density is again a mixture (variances s_k^2 + sigma^2), so
log p_sigma(y), its score and the posterior mean E[x | y] (the ideal denoiser) are all exact.
`GaussianRingDataModule` is `data=gaussian_ring`: 8 Gaussians on a circle of radius 2, std 0.1 (Song
& Ermon-style mode coverage: a sampler either finds every mode with its weight or it does not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from latentlab.data.base import LatentDataModule, SplitData, check_int
from latentlab.rng import Stream, keyed_generator
from latentlab.errors import ConfigError

LOG_2PI = math.log(2.0 * math.pi)


class GaussianMixture:
    """sum_k w_k N(mu_k, s_k^2 I) in R^D: means (K, D), stds (K,) or a scalar, weights (K,) (normalised)."""

    def __init__(self, means: Tensor, stds: Tensor | float, weights: Tensor | None = None) -> None:
        self.means = torch.as_tensor(means)
        if self.means.dim() != 2:
            raise ConfigError(f"mixture means must be (K, D), got {tuple(self.means.shape)}")
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=self.means.dtype).expand(k).clone()
        w = torch.ones(k, dtype=self.means.dtype) if weights is None else torch.as_tensor(weights, dtype=self.means.dtype)
        if w.shape != (k,) or not bool((w > 0).all()) or not bool((self.stds > 0).all()):
            raise ConfigError(f"mixture needs {k} positive weights and stds, got {w.tolist()}, {self.stds.tolist()}")
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _parts(self, y: Tensor, sigma: float) -> tuple[Tensor, Tensor, Tensor]:
        """Per component: log w_k N(y; mu_k, v_k I) (..., K), y - mu_k (..., K, D), v_k (K,)."""
        var = self.stds.to(y) ** 2 + float(sigma) ** 2
        diff = y.unsqueeze(-2) - self.means.to(y)
        log_comp = (self.weights.to(y).log() - 0.5 * (diff.pow(2).sum(-1) / var + self.dim * (var.log() + LOG_2PI)))
        return log_comp, diff, var

    def log_prob(self, y: Tensor, sigma: float = 0.0) -> Tensor:
        """log p_sigma(y) (...,) of the mixture convolved with N(0, sigma^2 I); sigma = 0 is the data."""
        return torch.logsumexp(self._parts(y, sigma)[0], -1)

    def responsibilities(self, y: Tensor, sigma: float = 0.0) -> Tensor:
        """p(component k | y) (..., K) under the noised mixture."""
        return torch.softmax(self._parts(y, sigma)[0], -1)

    def score(self, y: Tensor, sigma: float = 0.0) -> Tensor:
        """grad_y log p_sigma(y) = sum_k r_k (mu_k - y) / v_k, in closed form (no autograd)."""
        log_comp, diff, var = self._parts(y, sigma)
        r = torch.softmax(log_comp, -1)
        return -(r.unsqueeze(-1) * diff / var.unsqueeze(-1)).sum(-2)

    def posterior_mean(self, y: Tensor, sigma: float) -> Tensor:
        """E[x | y] for y = x + sigma eps: sum_k r_k (mu_k + s_k^2 / v_k (y - mu_k)), the MMSE denoiser."""
        log_comp, diff, var = self._parts(y, sigma)
        r = torch.softmax(log_comp, -1)
        shrink = (self.stds.to(y) ** 2 / var).unsqueeze(-1)
        return (r.unsqueeze(-1) * (self.means.to(y) + shrink * diff)).sum(-2)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n draws (n, D) and their component labels (n,), every random number from `generator`."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        return self.means[labels] + self.stds[labels].unsqueeze(-1) * eps, labels

    def nearest_mode(self, x: Tensor, radius: float) -> Tensor:
        """Index of the mean within `radius` of each x (n,), or -1 where x is near none (off-mode)."""
        dist = torch.cdist(x.to(self.means), self.means)
        best, idx = dist.min(-1)
        return torch.where(best < radius, idx, torch.full_like(idx, -1))


def ring_mixture(n_modes: int = 8, radius: float = 2.0, std: float = 0.1,
                 weights: Sequence[float] | None = None) -> GaussianMixture:
    """n_modes equal-std Gaussians evenly spaced on a circle in R^2 (mode 0 at angle 0)."""
    angle = torch.arange(n_modes, dtype=torch.float64) * (2.0 * math.pi / n_modes)
    means = radius * torch.stack([angle.cos(), angle.sin()], -1)
    return GaussianMixture(means, std, None if weights is None else torch.tensor(list(weights), dtype=torch.float64))


class GaussianRingDataModule(LatentDataModule):
    """`data=gaussian_ring`: draws of `ring_mixture(...)` with their mode index as label (and latent).

    `mixture` is the exact density (`mixture.log_prob`, `mixture.score(y, sigma)`), so tests and
    notebooks can compare a learned score with the truth and count a sampler's mode coverage.
    """

    name = "gaussian_ring"
    binarizable = False

    def __init__(
        self,
        n_modes: int = 8,
        radius: float = 2.0,
        std: float = 0.1,
        weights: Sequence[float] | None = None,
        num_train: int = 10000,
        num_val: int = 1000,
        num_test: int = 1000,
        data_seed: int = 0,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        pin_memory: bool = False,
    ) -> None:
        check_int("n_modes", n_modes, 1)
        check_int("num_train", num_train, 1)
        check_int("num_val", num_val, 0)
        check_int("num_test", num_test, 0)
        check_int("data_seed", data_seed, 0)
        if not (radius > 0 and std > 0):
            raise ConfigError(f"data.radius and data.std must be > 0, got {radius!r}, {std!r}")
        if weights is not None and len(weights) != n_modes:
            raise ConfigError(f"data.weights must list {n_modes} positive numbers (one per mode) or be null, got {weights!r}")
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         shuffle=shuffle, pin_memory=pin_memory)
        self.mixture = ring_mixture(n_modes, radius, std, weights)
        self.sizes = (num_train, num_val, num_test)
        self.data_seed = data_seed

    @property
    def data_dim(self) -> int:
        return 2

    def _load_splits(self) -> dict[str, SplitData]:
        splits = {}
        for i, (name, n) in enumerate(zip(("train", "val", "test"), self.sizes)):
            x, labels = self.mixture.sample(n, keyed_generator(self.data_seed, Stream.SYNTHETIC_DATA, i))
            splits[name] = SplitData(x.float(), labels=labels, latents=labels.unsqueeze(-1).float())
        return splits
