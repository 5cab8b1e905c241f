"""A training order that a resumed run continues exactly, mid-epoch included.

Lightning saves the `state_dict()` of every training dataloader that has one in its checkpoints and
calls `load_state_dict()` before the resumed run's first batch (its stateful-dataloader support);
with a loader that has none it restarts the epoch with a fresh shuffle and warns. Here:

- `ResumableSampler`: epoch `e`'s order is a permutation keyed on (seed, SHUFFLE, e), so it is a
  function of the epoch, not of how many random numbers were drawn before (Lightning's `set_epoch`
  gives it the epoch, as it does a DistributedSampler);
- `ResumableDataLoader`: its state is the position of training, (epoch, batches done), read from the
  trainer rather than counted in the sampler, which runs a batch ahead of training (Lightning
  prefetches one); loading it makes the next iterator start at that batch of that epoch's order.
  It draws its workers' base seed from its own generator, not the global one, so creating an
  iterator (at a different moment in a resumed run) leaves the global random stream alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from latentlab.rng import Stream, keyed_generator

Position = Callable[[], tuple[int, int]]  # () -> (epoch, batches of it done)


class ResumableSampler(DistributedSampler):
    """Indices 0..n-1, shuffled per epoch by a keyed generator (or in order), from `start` on once.

    Under DDP each of `num_replicas` ranks takes every num_replicas-th index of the epoch's order (padded
    by wrapping around to equal length, as `DistributedSampler` does); `start` counts this rank's indices.
    Being a `DistributedSampler`, Lightning uses it as it is rather than wrapping it (a wrapper would
    reshuffle and slice the order so that a mid-epoch resume no longer continues it).
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(int(n)), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.n = int(n)
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._start = int(epoch), 0

    def resume(self, epoch: int, start: int) -> None:
        """The next iterator yields epoch `epoch`'s order (this rank's share) from its `start`-th index."""
        self.epoch, self._start = int(epoch), int(start)

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's indices of epoch `epoch`, in order."""
        order = (torch.randperm(self.n, generator=keyed_generator(self.seed, Stream.SHUFFLE, epoch)) if self.shuffle
                 else torch.arange(self.n))
        if self.total_size > self.n:
            order = torch.cat([order, order.repeat(self.total_size // self.n + 1)[: self.total_size - self.n]])
        return order[self.rank: self.total_size: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        yield from self.order(self.epoch)[start:].tolist()

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `ResumableSampler` whose state is the trainer's position (module doc)."""

    def __init__(self, *args: Any, position: Position | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        super().__init__(*args, **kwargs)
        self.position = position

    def state_dict(self) -> dict[str, Any]:
        epoch, batches = self.position() if self.position is not None else (0, 0)
        return {"epoch": int(epoch), "batches": int(batches), "batch_size": int(self.batch_size or 1)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler = self.sampler
        if isinstance(sampler, ResumableSampler):
            sampler.resume(state["epoch"], state["batches"] * state["batch_size"])
