"""What a model learned about its latent space, for any latentlab model.

- `LatentDistributionMetrics`: the distribution of u = h_eta(z), z ~ N(0, I) (the likelihood mean of
  the decoder at prior draws, ALMOND's learned latent prior pi) against the true one, as
  Kolmogorov-Smirnov and 1-Wasserstein distances (`test/ks`, `test/w1`): the "many normal means"
  yardstick of Qiu & Wang (2020), usable with a VAE as well.
- `LatentMap`: for 2-d latent spaces, `latent_map.png` with decoded means over a grid of z and the
  posterior positions of training examples coloured by their label.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as L
from matplotlib.figure import Figure
import numpy as np
import torch
from scipy import stats
from torch import Tensor

from latentlab.callbacks.images import tile, to_images
from latentlab.errors import ConfigError
from latentlab.generative import GenerativeModel
from latentlab.rng import seeded_global_rng

log = logging.getLogger("latentlab")
REFERENCES = ("auto", "distribution", "latents")


@torch.no_grad()
def learned_latents(model: GenerativeModel, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n draws of u = E[x | z] = h_eta(z) with z ~ p(z), shape (n, data_dim), on the CPU."""
    device = next(model.parameters()).device
    z = torch.randn(n, model.latent_dim, generator=generator).to(device)  # CPU draws: same on every device
    return model.likelihood.mean(model.decode(z)).cpu()


def latent_distribution_distances(learned: Tensor, reference: Tensor) -> dict[str, float]:
    """Two-sample KS statistic and W1 distance between samples (n, k) and (m, k).

    For k > 1 the distances of the k marginals are averaged (a joint KS has no standard form).
    """
    learned, reference = learned.reshape(learned.shape[0], -1), reference.reshape(reference.shape[0], -1)
    if learned.shape[1] != reference.shape[1]:
        raise ConfigError(f"learned latents have {learned.shape[1]} coordinates but the reference has "
                          f"{reference.shape[1]}; the decoder's output must live where the true latents do")
    a, b = learned.double().numpy(), reference.double().numpy()
    ks = [stats.ks_2samp(a[:, j], b[:, j]).statistic for j in range(a.shape[1])]
    w1 = [stats.wasserstein_distance(a[:, j], b[:, j]) for j in range(a.shape[1])]
    return {"ks": float(np.mean(ks)), "w1": float(np.mean(w1))}


class LatentDistributionMetrics(L.Callback):
    """Logs `<stage>/ks` and `<stage>/w1` between the learned and the true latent distribution.

    The truth comes from the data module: with `reference=distribution` (or `auto` when it has one)
    `n_samples` draws of its `prior_distribution()`, the exact pi; with `latents` its
    `true_latents` (the training split's simulated latents). `stages`: any of "val", "test".
    """

    def __init__(self, n_samples: int = 10000, reference: str = "auto", seed: int = 0,
                 stages: Sequence[str] = ("test",)) -> None:
        if reference not in REFERENCES:
            raise ConfigError(f"LatentDistributionMetrics reference must be one of {REFERENCES}, got {reference!r}")
        if n_samples < 2:
            raise ConfigError(f"LatentDistributionMetrics n_samples must be >= 2, got {n_samples}")
        if not set(stages) <= {"val", "test"}:
            raise ConfigError(f"LatentDistributionMetrics stages must be among val, test; got {list(stages)}")
        self.n_samples, self.reference, self.seed, self.stages = int(n_samples), reference, int(seed), tuple(stages)

    def reference_sample(self, datamodule: Any) -> Tensor:
        """The true latent distribution as a sample (m, k)."""
        has_distribution = callable(getattr(datamodule, "prior_distribution", None))
        if self.reference == "distribution" or (self.reference == "auto" and has_distribution):
            if not has_distribution:
                raise ConfigError(f"{type(datamodule).__name__} has no prior_distribution(); use reference=latents")
            with seeded_global_rng(self.seed + 1):  # torch.distributions samples from the global RNG; apart from `seed`
                sample = datamodule.prior_distribution().sample((self.n_samples,))
            return sample.reshape(self.n_samples, -1).float()
        latents = getattr(datamodule, "true_latents", None)
        if latents is None:
            raise ConfigError("LatentDistributionMetrics needs synthetic data with known latents "
                              "(a data module with true_latents, e.g. data=normal_means)")
        return latents.reshape(latents.shape[0], -1).float()

    def compute(self, trainer: L.Trainer, pl_module: Any) -> dict[str, float]:
        generator = torch.Generator().manual_seed(self.seed)
        learned = learned_latents(pl_module.model, self.n_samples, generator)
        return latent_distribution_distances(learned, self.reference_sample(trainer.datamodule))

    def _log(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        if stage not in self.stages or trainer.sanity_checking:
            return
        for name, value in self.compute(trainer, pl_module).items():
            pl_module.log(f"{stage}/{name}", value, sync_dist=False)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._log(trainer, pl_module, "test")


@torch.no_grad()
def latent_positions(pl_module: Any, x: Tensor, index: Tensor, n_draws: int = 16) -> Tensor:
    """Where examples sit in z (batch, d): the mean of the method's `posterior(x, index)` (q's own mean where it
    is a Gaussian; else the mean of `n_draws` draws, e.g. over ALMOND's persistent chains, as in its paper's
    figure). Drawn from a fixed stream, so the picture takes no random numbers from training."""
    generator = torch.Generator(device=x.device).manual_seed(0)
    mean, _ = pl_module.posterior(x, index).fitted_gaussian(n_draws, generator)
    return mean


class LatentMap(L.Callback):
    """`latent_map.png` at the end of training, for models with a 2-d latent space.

    Left: E[x | z] over a `grid_size` x `grid_size` grid of z at standard-normal quantiles
    (Kingma & Welling's manifold figure). Right: positions of up to `max_points` training examples,
    coloured by label when the data module has labels.
    """

    def __init__(self, output_dir: str, grid_size: int = 20, max_points: int = 10000, batch_size: int = 500) -> None:
        if grid_size < 2 or max_points < 1 or batch_size < 1:
            raise ConfigError(f"LatentMap needs grid_size >= 2, max_points >= 1 and batch_size >= 1, "
                              f"got {grid_size}, {max_points}, {batch_size}")
        self.output_dir = Path(output_dir)
        self.grid_size, self.max_points, self.batch_size = grid_size, max_points, batch_size

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        if pl_module.latent_dim != 2:
            raise ConfigError(f"the latent_map callback draws a 2-d latent space, but model.latent_dim="
                              f"{pl_module.latent_dim}; set model.latent_dim=2 or drop callbacks.latent_map")

    def grid(self, pl_module: Any) -> np.ndarray:
        """Decoded means over the quantile grid as one tiled picture."""
        q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, self.grid_size))
        zy, zx = torch.meshgrid(q.flip(0), q, indexing="ij")  # rows top to bottom: z2 decreasing
        z = torch.stack([zx, zy], -1).reshape(-1, 2).to(pl_module.device)
        with torch.no_grad():
            means = pl_module.model.likelihood.mean(pl_module.model.decode(z))
        return tile(to_images(means, getattr(pl_module, "image_shape", None)), self.grid_size)

    def positions(self, trainer: L.Trainer, pl_module: Any) -> tuple[np.ndarray, np.ndarray | None] | None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "data"):
            return None
        x_all = datamodule.data("train")
        n = min(self.max_points, x_all.shape[0])
        points = []
        for start in range(0, n, self.batch_size):
            index = torch.arange(start, min(start + self.batch_size, n))
            z = latent_positions(pl_module, x_all[index].to(pl_module.device), index.to(pl_module.device))
            points.append(z.cpu())
        labels = datamodule.labels("train") if hasattr(datamodule, "labels") else None
        return torch.cat(points).numpy(), None if labels is None else labels[:n].numpy()

    def write(self, trainer: L.Trainer, pl_module: Any) -> Path:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / "latent_map.png"
        placed = self.positions(trainer, pl_module)
        fig = Figure(figsize=(12 if placed is not None else 6, 6))
        axes = fig.subplots(1, 2 if placed is not None else 1)
        axes = np.atleast_1d(axes)
        axes[0].imshow(self.grid(pl_module), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[0].set_title("E[x | z] over a grid of z (normal quantiles 0.05..0.95)")
        axes[0].set_axis_off()
        if placed is not None:
            z, labels = placed
            scatter = axes[1].scatter(z[:, 0], z[:, 1], c=labels, s=2, cmap="tab10" if labels is not None else None)
            if labels is not None:
                fig.colorbar(scatter, ax=axes[1], label="label")
            axes[1].set_xlabel("z1")
            axes[1].set_ylabel("z2")
            axes[1].set_title("training examples in latent space")
        fig.savefig(path, bbox_inches="tight", dpi=100)
        return path

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.is_global_zero:
            log.info("latent map written to %s", self.write(trainer, pl_module))
