"""ALMOND's persistent Langevin chains: per-example state that outlives a training step.

`PersistentChains` holds (n_chains, N, d) chain states indexed by the data modules' example `index`, a visited
mask (a chain is initialised when its example is first seen), and for adaptive samplers (MALA) each chain's step
size and move count, which the sampler continues from (its adaptation window is counted per chain across calls).
Under DDP every process keeps the same copy: `write` all-gathers (index, z, step, count) first. It is a plain
object, not a Module (DDP would broadcast buffers every step), testable without a Trainer; its `state_dict`
travels in checkpoints and `load_state_dict` refuses a copy of another shape.
Memory: N x n_chains x d floats (MNIST, 60k x 20 x 20: 96 MB), plus 2 x N x n_chains with an adaptive sampler.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from latentlab.errors import CheckpointError

AllGather = Callable[[Tensor], Tensor]  # (…) -> (world, …), e.g. LightningModule.all_gather


def first_occurrences(index: Tensor) -> Tensor:
    """Positions of the first occurrence of each distinct value of `index`, in value order.

    DistributedSampler pads with repeated examples; writing each index once keeps the chain update
    deterministic (a scatter with duplicate indices is not, on GPUs).
    """
    if index.numel() == 0:
        return index
    values, inverse = torch.unique(index, return_inverse=True)  # its output's size is known: no further read
    positions = torch.arange(index.numel(), device=index.device)
    first = torch.full((values.numel(),), index.numel(), dtype=torch.long, device=index.device)
    return first.scatter_reduce_(0, inverse, positions, reduce="amin")


class PersistentChains:
    """Chain states of N examples: `read(index)`, `write(index, z, step, count)`, checkpoint state."""

    def __init__(self, n_chains: int, num_examples: int, latent_dim: int, step_size: float | None = None,
                 device: torch.device | str = "cpu") -> None:
        """`step_size` (the sampler's initial step) allocates per-chain step sizes and counts; None: ULA."""
        shape = (int(n_chains), int(num_examples))
        self.latent_dim = int(latent_dim)
        self.z = torch.zeros(*shape, self.latent_dim, device=device)
        self.visited = torch.zeros(shape[1], dtype=torch.bool, device=device)
        self.initial_step = step_size
        self.step = None if step_size is None else torch.full(shape, float(step_size), device=device)
        self.count = None if step_size is None else torch.zeros(shape, dtype=torch.long, device=device)

    @property
    def n_chains(self) -> int:
        return self.z.shape[0]

    @property
    def num_examples(self) -> int:
        return self.z.shape[1]

    @property
    def adaptive(self) -> bool:
        return self.step is not None

    def to(self, device: torch.device | str) -> "PersistentChains":
        self.z, self.visited = self.z.to(device), self.visited.to(device)
        if self.step is not None and self.count is not None:
            self.step, self.count = self.step.to(device), self.count.to(device)
        return self

    def read(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(z (C, batch, d), fresh (batch,) bool, step (C, batch) | None, count (C, batch) | None) of `index`;
        fresh chains' step sizes and counts are the initial ones (their stored z is meaningless)."""
        index = index.to(self.z.device)
        fresh = ~self.visited[index]
        if self.step is None or self.count is None:
            return self.z[:, index], fresh, None, None
        step = torch.where(fresh, float(self.initial_step or 0.0), self.step[:, index])
        count = torch.where(fresh, 0, self.count[:, index])
        return self.z[:, index], fresh, step, count

    def write(self, index: Tensor, z: Tensor, step: Tensor | None = None, count: Tensor | None = None,
              all_gather: AllGather | None = None) -> None:
        """Store new states; with `all_gather` (world size > 1) gather every process's update first."""
        if all_gather is not None:
            index, z, step, count = self._gather(index, z, step, count, all_gather)
        keep = first_occurrences(index)
        index = index[keep]
        self.z[:, index] = z[:, keep].detach().to(self.z.dtype)
        self.visited[index] = True
        if self.step is not None and self.count is not None and step is not None and count is not None:
            self.step[:, index] = step[:, keep].to(self.step.dtype)
            self.count[:, index] = count[:, keep].to(self.count.dtype)

    def _gather(self, index: Tensor, z: Tensor, step: Tensor | None, count: Tensor | None,
                all_gather: AllGather) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(index, z, step, count) from all processes, batch sizes padded to the largest (index -1 = padding)."""
        batch = index.shape[0]
        largest = int(all_gather(torch.tensor(batch, device=index.device)).max())
        pad = largest - batch
        index = torch.nn.functional.pad(index, (0, pad), value=-1)
        extra = [] if step is None or count is None else [step.unsqueeze(-1), count.to(z.dtype).unsqueeze(-1)]
        packed = torch.nn.functional.pad(torch.cat([z, *extra], dim=-1), (0, 0, 0, pad))  # (C, largest, d [+2])
        all_index = all_gather(index).reshape(-1)                                          # (W * largest,)
        all_packed = all_gather(packed).movedim(0, 1).reshape(z.shape[0], -1, packed.shape[-1])
        valid = all_index >= 0
        all_index, all_packed = all_index[valid], all_packed[:, valid]
        d = z.shape[-1]
        if not extra:
            return all_index, all_packed, None, None
        return all_index, all_packed[..., :d], all_packed[..., d], all_packed[..., d + 1].round().long()

    # ----- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor | None]:
        """CPU tensors only, so a checkpoint loads with torch.load(weights_only=True)."""
        return {"chains": self.z.detach().cpu(), "visited": self.visited.cpu(),
                "chain_step": None if self.step is None else self.step.cpu(),
                "chain_count": None if self.count is None else self.count.cpu()}

    def load_state_dict(self, state: dict[str, Tensor | None]) -> None:
        """Restore a saved copy of the same (n_chains, N, d); older checkpoints without counts load as counted
        past any adaptation window (their step sizes were already adapted)."""
        chains, visited = state["chains"], state["visited"]
        assert chains is not None and visited is not None
        if tuple(chains.shape) != tuple(self.z.shape):
            raise CheckpointError(f"checkpoint chains have shape {tuple(chains.shape)} (n_chains, N, latent_dim) but "
                                  f"this model has {tuple(self.z.shape)}; resume with the same model.n_chains, "
                                  f"model.latent_dim and data settings")
        device = self.z.device
        self.z, self.visited = chains.to(device), visited.to(device)
        if self.step is not None:
            step, count = state.get("chain_step"), state.get("chain_count")
            if step is not None:
                self.step = step.to(device)
                self.count = (count.to(device) if count is not None
                              else torch.full_like(self.step, torch.iinfo(torch.int32).max, dtype=torch.long))
