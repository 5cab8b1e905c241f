"""Callbacks: pictures of samples and reconstructions written to the run directory and the loggers."""

from latentlab.callbacks.images import ImageGrid, save_image_grid
from latentlab.callbacks.latents import LatentDistributionMetrics, LatentMap

__all__ = ["ImageGrid", "save_image_grid", "LatentDistributionMetrics", "LatentMap"]
