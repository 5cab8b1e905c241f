"""Keyed random streams, the one RNG module of the project: a generator per (seed, purpose, ...) key.

numpy's `SeedSequence` hashes a tuple of non-negative integers into a well-mixed seed (its purpose is exactly
this: independent streams from structured keys), so every draw is a function of its key alone (seed, purpose,
epoch, batch, rank), never of call order: a resumed run draws what the uninterrupted one would. The purpose
(`Stream`) is always the second key, so streams of different purposes never coincide.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator

import numpy as np
import torch

#: the split ids that key per-split streams (data subsets, binarization, ALMOND's evaluation chains)
SPLIT_IDS: dict[str, int] = {"train": 0, "val": 1, "test": 2, "predict": 3}


class Stream(enum.IntEnum):
    """What a keyed stream is for (the second key of every key tuple)."""

    STATIC_BINARIZATION = 1
    DYNAMIC_BINARIZATION = 2
    SUBSET = 3
    SPLIT_PERMUTATION = 4
    SYNTHETIC_DATA = 5
    SHUFFLE = 6  # the training order of each epoch (latentlab.data.resumable)
    LANGEVIN_TRAIN = 7  # ALMOND: E-step noise, chain initialisation, warm-up reparameterisation
    LANGEVIN_EVAL = 8  # ALMOND: fresh chains of examples without persistent ones
    WARMUP_ELBO = 9  # ALMOND: the warm-up encoder's validation ELBO
    EVAL_ANALYSIS = 10  # latentlab-eval: one stream per analysis (samples grid, BDMC, gaps, pictures, quality)
    EVAL_DIAGNOSTICS = 11  # val/test: a method's own diagnostics (`evaluate_batch`: ELBO draws, AVB's discriminator)


def key_seed(*keys: int) -> int:
    """A well-mixed 64-bit seed from the non-negative integer `keys`."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0])


def keyed_generator(*keys: int, device: torch.device | str | None = None) -> torch.Generator:
    """A generator on `device` (default CPU) seeded by a hash of the non-negative integer `keys`."""
    return torch.Generator(device=device or "cpu").manual_seed(key_seed(*keys))


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """The CPU's global random stream, and `device`'s if it is an accelerator, seeded with `seed` inside the block and
    restored after it.

    For code that can only draw from the global stream (torch.distributions' `sample`, a method's `randn_like`, a
    network's initialisation): its draws become a function of `seed`, and the caller's stream is where it was, so
    evaluation never shifts the training's noise. Only the generators restored are seeded: `torch.manual_seed` would
    also reseed every other GPU, and MPS, for good."""
    device = torch.device(device)
    accelerator = device.type != "cpu"
    with torch.random.fork_rng(devices=[device] if accelerator else [], device_type=device.type if accelerator else None):
        torch.default_generator.manual_seed(seed)
        if accelerator:
            module = torch.get_device_module(device.type)
            per_device = getattr(module, "default_generators", None)  # cuda, xpu: one generator per device
            if per_device:
                per_device[device.index if device.index is not None else module.current_device()].manual_seed(seed)
            else:  # mps: one
                module.manual_seed(seed)
        yield
