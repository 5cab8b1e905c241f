"""Keyed random streams: a generator per (seed, purpose, ...) key, independent of call order.

numpy's `SeedSequence` hashes the key tuple into a well-mixed seed (its purpose is exactly this:
independent streams from structured keys), and a fresh `torch.Generator` draws from it. The
purpose is always the second key, so streams of different purposes never coincide.
"""

from __future__ import annotations

import enum

import numpy as np
import torch


class Stream(enum.IntEnum):
    """What a keyed stream is for (the second key of every key tuple)."""

    STATIC_BINARIZATION = 1
    DYNAMIC_BINARIZATION = 2
    SUBSET = 3
    SPLIT_PERMUTATION = 4
    SYNTHETIC_DATA = 5
    SHUFFLE = 6  # the training order of each epoch (latentlab.data.resumable)


def keyed_generator(seed: int, stream: Stream, *keys: int) -> torch.Generator:
    """A CPU generator seeded by a hash of (seed, stream, *keys), all non-negative integers."""
    entropy = [int(seed), int(stream), *(int(k) for k in keys)]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))
