"""The one place figures are made: matplotlib's object API (no pyplot state, works headless and in notebooks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (4.0, 3.5)) -> tuple[Figure, np.ndarray]:
    """A Figure and a flat array of its axes, each panel `size` inches (width, height)."""
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, np.asarray(axes).reshape(-1)


def image_panel(ax: Any, image: np.ndarray, title: str | None = None) -> None:
    """A grey image without ticks, values in [0, 1]."""
    ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def tile_pngs(path: Path, pictures: list[tuple[str, Path]], size: tuple[float, float] = (9.0, 4.5),
              side_by_side: bool = False) -> Path | None:
    """Saved pictures (title, png) stacked (or side by side) in one figure at `path`; None when there are none."""
    if not pictures:
        return None
    from matplotlib.image import imread

    n = len(pictures)
    fig, axes = new_figure(1, n, size=size) if side_by_side else new_figure(n, 1, size=size)
    for ax, (label, png) in zip(axes, pictures):
        ax.imshow(imread(png))
        ax.set_axis_off()
        ax.set_title(label)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
