"""Sample and reconstruction grids: PNG files in the run directory, and images in W&B / TensorBoard."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as L
from matplotlib.figure import Figure
import numpy as np
import torch
from torch import Tensor

from latentlab.models.base import LatentVariableModel


@torch.no_grad()
def reconstruction(pl_module: Any, x: Tensor, index: Tensor, seed: int = 0) -> Tensor | None:
    """E[x | z] at z = the mean of the method's Gaussian posterior, else one draw of `posterior(x, index)`;
    None for a model without p(z) (the denoiser). Draws from its own stream, never the training's."""
    if not isinstance(pl_module, LatentVariableModel):
        return None
    posterior = pl_module.posterior(x, index)
    gaussian = posterior.gaussian()
    z = gaussian[0] if gaussian is not None else posterior.sample(1, torch.Generator(x.device).manual_seed(seed))[0]
    return pl_module.model.likelihood.mean(pl_module.model.decode(z))


def tile(images: np.ndarray, nrow: int) -> np.ndarray:
    """(n, H, W) -> one (rows*H, nrow*W) mosaic with 1-pixel gaps (what torchvision's make_grid does)."""
    n, h, w = images.shape
    rows = int(np.ceil(n / nrow))
    grid = np.ones((rows * (h + 1) + 1, nrow * (w + 1) + 1), dtype=np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = img
    return grid


def to_images(x: Tensor, image_shape: Sequence[int] | None) -> np.ndarray:
    """Flat (n, D) -> (n, H, W) greyscale in [0, 1]; vectors without an image shape become 1-row strips."""
    x = x.detach().float().cpu().clamp(0, 1)
    if image_shape is None:
        return x.reshape(x.shape[0], 1, -1).numpy()
    return x.reshape(x.shape[0], *image_shape)[:, 0].numpy()


def save_image_grid(x: Tensor, image_shape: Sequence[int] | None, path: str | Path, nrow: int = 8, title: str = "") -> np.ndarray:
    grid = tile(to_images(x, image_shape), nrow)
    fig = Figure(figsize=(max(2.0, grid.shape[1] / 24), max(2.0, grid.shape[0] / 24)))  # no pyplot: no global state
    ax = fig.subplots()
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    fig.savefig(path, bbox_inches="tight", dpi=100)
    return grid


@contextmanager
def private_rng(devices: Sequence[torch.device] = ()) -> Iterator[None]:
    """Run a block without touching any random stream training draws from: torch (CPU and `devices`),
    numpy and Python's states are restored afterwards. Logging (a DataLoader iterator draws its base seed,
    AVB draws noise) then leaves a run's result the same with and without the pictures."""
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = [d.index if d.index is not None else torch.cuda.current_device() for d in devices if d.type == "cuda"]
    try:
        with torch.random.fork_rng(devices=cuda, enabled=True):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def to_uint8(grid: np.ndarray) -> np.ndarray:
    """A [0, 1] float picture as uint8 0-255: wandb casts floats to uint8 without scaling (all black)."""
    return (np.clip(grid, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def is_logger(logger: Any, kind: str) -> bool:
    """Whether `logger` is Lightning's `kind` (WandbLogger, TensorBoardLogger) or a subclass of it."""
    return any(cls.__name__ == kind for cls in type(logger).__mro__)


def log_image(trainer: L.Trainer, key: str, grid: np.ndarray, step: int) -> None:
    """Send a [0, 1] greyscale picture to every logger that takes images (W&B, TensorBoard); CSV has none."""
    picture = to_uint8(grid)
    for logger in trainer.loggers:
        if is_logger(logger, "WandbLogger"):
            logger.log_image(key=key, images=[picture], step=step)
        elif is_logger(logger, "TensorBoardLogger"):
            logger.experiment.add_image(key, picture[None], global_step=step, dataformats="CHW")


class ImageGrid(L.Callback):
    """Writes `samples.png` and `reconstructions.png` (originals on odd rows) at the end of fit and test."""

    def __init__(self, output_dir: str, n: int = 64, nrow: int = 8, every_n_epochs: int = 0, seed: int = 0) -> None:
        self.output_dir = Path(output_dir)
        self.n, self.nrow, self.every_n_epochs, self.seed = n, nrow, every_n_epochs, seed

    def _write(self, trainer: L.Trainer, pl_module: Any, suffix: str = "") -> None:
        if not trainer.is_global_zero:
            return
        with private_rng([pl_module.device]):
            self._draw(trainer, pl_module, suffix)

    def _draw(self, trainer: L.Trainer, pl_module: Any, suffix: str) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        shape = getattr(pl_module, "image_shape", None)
        was_training = pl_module.training
        pl_module.eval()
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        samples = pl_module.sample(self.n, generator=generator).cpu()
        grid = save_image_grid(samples, shape, self.output_dir / f"samples{suffix}.png", self.nrow, "samples")
        log_image(trainer, "samples", grid, trainer.global_step)
        batch = next(iter(trainer.datamodule.test_dataloader())) if trainer.datamodule is not None else None
        if batch is not None:
            x, index = batch[0][: self.n // 2].to(pl_module.device), batch[1][: self.n // 2].to(pl_module.device)
            recon = reconstruction(pl_module, x, index, self.seed)
            if recon is not None:
                x, recon = x.cpu(), recon.cpu()
                rows = []  # a row of originals, then the row of their reconstructions
                for i in range(0, x.shape[0], self.nrow):
                    rows += [x[i: i + self.nrow], recon[i: i + self.nrow]]
                grid = save_image_grid(torch.cat(rows), shape, self.output_dir / f"reconstructions{suffix}.png",
                                       self.nrow, "data (odd rows) / reconstruction (even rows)")
                log_image(trainer, "reconstructions", grid, trainer.global_step)
        pl_module.train(was_training)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._write(trainer, pl_module, f"_epoch{trainer.current_epoch:03d}")

    def on_test_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._write(trainer, pl_module)
