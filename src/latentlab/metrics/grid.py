"""Exact log p(x) and exact posteriors for models with a 2-d latent, by quadrature on a grid.

With d = 2, p(x) = integral p(x | z) p(z) dz is a 2-d integral a midpoint rule computes to any
accuracy: no proposal, no bound, no Monte Carlo error. That makes it the referee for small
problems (AVB's 4-point toy): it scores any method's generative model, VAE, AVB or ALMOND, alike.

Accuracy: the grid covers [-limit, limit]^2; the prior mass outside is 1 - (1 - 2 Phi(-limit))^2
(about 4e-9 for limit = 6), which bounds the truncation error of p(x) relative to max_z p(x | z)
(at most 1 for discrete x). The midpoint rule's error shrinks as spacing^2 for smooth integrands.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch import Tensor

from latentlab.errors import ConfigError
from latentlab.generative import GenerativeModel


def latent_grid(limit: float = 6.0, resolution: int = 241, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, float]:
    """Cell midpoints of a resolution x resolution grid on [-limit, limit]^2.

    Returns (z (resolution^2, 2) in row-major order with z[:, 0] varying fastest, the 1-d axis
    (resolution,), log of one cell's area).
    """
    if not limit > 0 or int(resolution) < 2:
        raise ConfigError(f"latent grid needs limit > 0 and resolution >= 2, got {limit}, {resolution}")
    h = 2.0 * limit / resolution
    axis = torch.linspace(-limit + h / 2, limit - h / 2, int(resolution), device=device, dtype=dtype)
    zy, zx = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([zx.reshape(-1), zy.reshape(-1)], dim=-1), axis, 2.0 * math.log(h)


@torch.no_grad()
def grid_log_joint(model: GenerativeModel, x: Tensor, z: Tensor, max_elements: int = 2**24) -> Tensor:
    """log p(x_b, z_g) for every grid point g and example b, (G, batch).

    The decoder runs once per grid point (not once per pair); the likelihood scores all pairs at once
    (`Likelihood.pairwise_log_prob`: a matrix product for the built-in likelihoods).
    """
    if model.latent_dim != 2:
        raise ConfigError(f"grid quadrature needs a 2-d latent, the model has latent_dim={model.latent_dim}")
    params = model.decode(z)
    return model.likelihood.pairwise_log_prob(x.reshape(x.shape[0], -1), params, max_elements) \
        + model.prior.log_prob(z)[:, None]


@torch.no_grad()
def grid_log_likelihood(model: GenerativeModel, x: Tensor, limit: float = 6.0, resolution: int = 241) -> Tensor:
    """Exact (to quadrature accuracy) log p(x) per example, (batch,): logsumexp over cells + log area."""
    z, _, log_area = latent_grid(limit, resolution, x.device, x.dtype)
    return torch.logsumexp(grid_log_joint(model, x, z), 0) + log_area


@torch.no_grad()
def grid_posterior(model: GenerativeModel, x: Tensor, limit: float = 6.0, resolution: int = 241) -> tuple[Tensor, Tensor]:
    """Exact posteriors p(z | x) on the grid: (cell probabilities (batch, resolution, resolution), summing
    to 1 per example, indexed [y, x]; the 1-d axis)."""
    z, axis, _ = latent_grid(limit, resolution, x.device, x.dtype)
    log_joint = grid_log_joint(model, x, z)
    probs = torch.softmax(log_joint, dim=0).T
    return probs.reshape(x.shape[0], int(resolution), int(resolution)), axis


@torch.no_grad()
def posterior_samples(module: Any, x: Tensor, index: Tensor | None, n: int,
                      generator: torch.Generator | None = None) -> Tensor:
    """n draws (n, batch, d) of the method's own approximate posterior, `module.posterior(x, index)`."""
    return module.posterior(x, index).sample(n, generator)


def plot_posteriors(path: str | Path, exact: Tensor, axis: Tensor, samples: Tensor | None = None,
                    title: str = "") -> None:
    """The paper's figure: per data point, samples of the method's q(z|x) (left) and the exact p(z|x)
    (right), one colour per point; regions of several points blend."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    import numpy as np

    colours = colormaps["tab10"](np.arange(exact.shape[0]) % 10)[:, :3]
    lim = float(axis[-1])
    # white background; each posterior tints its cells with its colour in proportion to its density
    ink = np.zeros((*exact.shape[1:], 3))
    for p, c in zip(exact.cpu().numpy(), colours):
        ink += (p / max(p.max(), 1e-30))[..., None] * (1.0 - c)
    image = np.clip(1.0 - ink, 0.0, 1.0)
    ncols = 2 if samples is not None else 1
    fig = Figure(figsize=(4.5 * ncols, 4.5))
    axes = fig.subplots(1, ncols, squeeze=False)
    if samples is not None:
        ax = axes[0, 0]
        s = samples.detach().cpu().numpy()
        for i, c in enumerate(colours):
            ax.scatter(s[:, i, 0], s[:, i, 1], s=3, color=c, alpha=0.4, edgecolors="none", label=f"x{i}")
        ax.set_title("q(z|x): method's posterior samples")
    ax = axes[0, -1]
    ax.imshow(image, origin="lower", extent=(-lim, lim, -lim, lim), interpolation="nearest")
    ax.set_title("exact p(z|x) (grid)")
    for ax in axes[0]:
        ax.set_xlim(-3.5, 3.5)
        ax.set_ylim(-3.5, 3.5)
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


class PosteriorGrid(L.Callback):
    """For ANY method with a 2-d latent: logs `test/exact_log_lik` (quadrature, nats per example,
    averaged over up to `max_examples` test examples, with `test/exact_log_lik_se`) and writes
    `posteriors.png` (the first `n_points` distinct test points). Other latent sizes: does nothing.
    """

    def __init__(self, output_dir: str | Path, limit: float = 6.0, resolution: int = 241, max_examples: int = 1024,
                 n_points: int = 4, n_samples: int = 500, filename: str = "posteriors.png") -> None:
        latent_grid(limit, resolution)  # validates the settings before any training
        self.output_dir = Path(output_dir)
        self.limit, self.resolution, self.max_examples = float(limit), int(resolution), int(max_examples)
        self.n_points, self.n_samples, self.filename = int(n_points), int(n_samples), filename
        self._x: list[Tensor] = []
        self._index: list[Tensor] = []

    @staticmethod
    def _applies(pl_module: Any) -> bool:
        return pl_module.model.latent_dim == 2

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._x, self._index = [], []

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Sequence[Tensor],
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        have = sum(len(t) for t in self._x)
        if self._applies(pl_module) and have < self.max_examples:
            self._x.append(batch[0][: self.max_examples - have].detach())
            self._index.append(batch[1][: self.max_examples - have].detach())

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not self._applies(pl_module) or not self._x:
            return
        x, index = torch.cat(self._x), torch.cat(self._index)
        log_px = grid_log_likelihood(pl_module.model, x, self.limit, self.resolution)
        se = log_px.std() / math.sqrt(len(log_px)) if len(log_px) > 1 else torch.zeros(())
        pl_module.log("test/exact_log_lik", log_px.mean())
        pl_module.log("test/exact_log_lik_se", se)
        if trainer.is_global_zero:
            self._picture(pl_module, x, index)

    def _picture(self, pl_module: Any, x: Tensor, index: Tensor) -> None:
        keep = _first_distinct(x, self.n_points)
        x, index = x[keep], index[keep]
        exact, axis = grid_posterior(pl_module.model, x, self.limit, self.resolution)
        samples = posterior_samples(pl_module, x, index, self.n_samples)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        plot_posteriors(self.output_dir / self.filename, exact, axis, samples, title=pl_module.method)


def _first_distinct(x: Tensor, n: int) -> Tensor:
    """Positions of the first n distinct rows of x (the toy data repeat 4 points)."""
    keep: list[int] = []
    for i in range(x.shape[0]):
        if all(not torch.equal(x[i], x[j]) for j in keep):
            keep.append(i)
            if len(keep) == n:
                break
    return torch.tensor(keep, dtype=torch.long, device=x.device)


__all__ = [
    "PosteriorGrid",
    "grid_log_joint",
    "grid_log_likelihood",
    "grid_posterior",
    "latent_grid",
    "plot_posteriors",
    "posterior_samples",
]
