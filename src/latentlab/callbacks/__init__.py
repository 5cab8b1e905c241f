"""Callbacks: pictures of samples and reconstructions written to the run directory and the loggers."""

from latentlab.callbacks.images import ImageGrid, save_image_grid

__all__ = ["ImageGrid", "save_image_grid"]
