"""Reproducible binarization of grey-level data in [0, 1].

Every random draw here comes from a keyed generator (`latentlab.rng.keyed_generator`) of
(seed, purpose, split or epoch, chunk of rows). A draw therefore depends only
on *which* example it is and *when* (epoch), never on batch composition, sampler order, number of
DDP processes or data-loader workers; a run resumed at an epoch boundary sees the same draws as an
uninterrupted one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentlab.rng import Stream, keyed_generator

BINARIZE_MODES = ("none", "static", "dynamic")
# Rows drawn per generator: bounds temporary memory and lets `DynamicBinarizer` draw lazily.
CHUNK_ROWS = 1024


def bernoulli_chunk(probs: Tensor, seed: int, stream: Stream, *keys: int) -> Tensor:
    """One Bernoulli draw per entry of `probs` (rows of one chunk), as bool, from a keyed generator."""
    return torch.rand(probs.shape, generator=keyed_generator(seed, stream, *keys), dtype=probs.dtype) < probs


def static_binarize(x: Tensor, seed: int, split_id: int, threshold: float | None = None) -> Tensor:
    """Binarize once: `x > threshold` if given, else one Bernoulli(x) sample keyed on (seed, split).

    Used for `binarize="static"` on every split, and for val/test under `"dynamic"` so that their
    metrics compare across epochs.
    """
    if threshold is not None:
        return (x > threshold).to(x.dtype)
    out = torch.empty(x.shape, dtype=torch.bool)
    for chunk, start in enumerate(range(0, x.shape[0], CHUNK_ROWS)):
        rows = slice(start, start + CHUNK_ROWS)
        out[rows] = bernoulli_chunk(x[rows], seed, Stream.STATIC_BINARIZATION, split_id, chunk)
    return out.to(x.dtype)


class DynamicBinarizer:
    """Fresh Bernoulli(x) draws per example and epoch (AVB, IWAE), keyed on (seed, epoch, row chunk).

    Draws for one epoch are made lazily, chunk by chunk of `CHUNK_ROWS` rows, the first time a batch
    touches the chunk, and kept in a bool table of the split's size (1 byte per entry) until the
    epoch changes. Cost per epoch equals drawing every pixel once, as a per-batch `torch.bernoulli`
    would; the cost per batch is one row gather.
    """

    def __init__(self, probs: Tensor, seed: int) -> None:
        self.probs = probs
        self.seed = seed
        self._epoch: int | None = None
        self._table = torch.empty(probs.shape, dtype=torch.bool)
        self._ready = torch.zeros((probs.shape[0] + CHUNK_ROWS - 1) // CHUNK_ROWS, dtype=torch.bool)

    def __call__(self, index: Tensor, epoch: int) -> Tensor:
        """Binary rows (float, like `probs`) of the examples `index` (positions in the split) at `epoch`."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        index = index.to("cpu", torch.int64)
        if epoch != self._epoch:
            self._epoch = epoch
            self._ready.zero_()
        chunks = torch.unique(index // CHUNK_ROWS)
        for chunk in chunks[~self._ready[chunks]].tolist():
            rows = slice(chunk * CHUNK_ROWS, (chunk + 1) * CHUNK_ROWS)
            draw = bernoulli_chunk(self.probs[rows], self.seed, Stream.DYNAMIC_BINARIZATION, epoch, chunk)
            self._table[rows] = draw
            self._ready[chunk] = True
        return self._table[index].to(self.probs.dtype)
