"""Running many independent chains block by block, so that a decoder's activations stay in cache.

ALMOND's E-step moves n_chains x batch chains through the decoder at once: 100 chains x 1000 examples on the
many-normal-means problem are 100k rows, and a 100-wide hidden layer over them is 40 MB, far beyond a CPU's
caches, so every matmul and activation streams from memory. Split along the chains dimension into blocks of
about `rows` rows, the same FLOPs run 1.3-3x faster on one core (benchmarks/almond_estep.py). The chains are
independent, so running the K moves block after block is the same Markov chain in law (each block draws its
own noise from the one generator, so fixed-seed runs are reproducible, though not equal to unblocked ones).

The contract: z has shape (n_chains, ..., d) and the target is the sum of per-chain terms whose other
operands broadcast against z's trailing dimensions (as `partial(model.log_joint, x)` with x (batch, D) does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from latentlab.samplers.langevin import LogProb, SamplerResult

Sample = Callable[..., SamplerResult]


def chains_per_block(z: Tensor, rows: int | None) -> int:
    """How many entries of z's first (chains) dimension make about `rows` rows (at least 1; all when rows is None
    or z has no separate chains dimension)."""
    if rows is None or z.dim() < 3:
        return z.shape[0]
    per_chain = max(1, z[0, ..., 0].numel())
    return max(1, min(z.shape[0], int(rows) // per_chain))


def _split(value: float | Tensor | None, like: Tensor, size: int) -> list[float | Tensor | None]:
    """A per-chain tensor (shaped like z.shape[:-1]) split with z; anything else passed to every block."""
    n_blocks = -(-like.shape[0] // size)
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == like.shape[0] and value.dim() == like.dim() - 1:
        return list(value.split(size))
    return [value] * n_blocks


def _merge(results: list[SamplerResult], sizes: list[int]) -> SamplerResult:
    """One result from the blocks': states and per-chain tensors concatenated, counts (`n_*`) summed, other scalar
    diagnostics (means over chains) weighted by block size."""
    if len(results) == 1:
        return results[0]
    total = sum(sizes)
    diagnostics: dict[str, float | Tensor] = {}
    for key, first in results[0].diagnostics.items():
        values = [r.diagnostics[key] for r in results]
        if isinstance(first, Tensor) and first.dim() > 0:
            diagnostics[key] = torch.cat(values)  # type: ignore[arg-type]
        elif key.startswith("n_"):
            diagnostics[key] = sum(float(v) for v in values)
        else:
            diagnostics[key] = sum(float(v) * s for v, s in zip(values, sizes, strict=True)) / total
    samples = None if results[0].samples is None else torch.cat([r.samples for r in results], 1)  # type: ignore[misc]
    counts = None if results[0].step_count is None else torch.cat([r.step_count for r in results])  # type: ignore[misc]
    return SamplerResult(torch.cat([r.z for r in results]), torch.cat([r.step_size for r in results]), samples,
                         diagnostics, counts)


def sample_in_blocks(sample: Sample, log_prob: LogProb, z0: Tensor, rows: int | None, generator: torch.Generator | None = None,
                     *, step_size: float | Tensor | None = None, step_count: Tensor | None = None,
                     keep_samples: bool = False) -> SamplerResult:
    """`sample(log_prob, z0, generator, ...)` (a sampler's bound `sample`) run on blocks of about `rows` rows of z0's
    chains, one after the other, merged into one result."""
    size = chains_per_block(z0, rows)
    if size >= z0.shape[0]:
        return sample(log_prob, z0, generator, keep_samples=keep_samples, step_size=step_size, step_count=step_count)
    blocks = z0.split(size)
    results = [sample(log_prob, zb, generator, keep_samples=keep_samples, step_size=s, step_count=c)
               for zb, s, c in zip(blocks, _split(step_size, z0, size), _split(step_count, z0, size), strict=True)]
    return _merge(results, [b.shape[0] for b in blocks])


def backward_in_blocks(loss_of: Callable[[Tensor], Tensor], z: Tensor, rows: int | None,
                       backward: Callable[[Tensor], None], extra: Tensor | None = None) -> Tensor:
    """sum_b loss_of(z_b) over blocks of z's chains, back-propagated one block at a time (each block's activations
    freed before the next is built), and through z's own graph (an encoder's reparameterisation) once, with the
    blocks' summed gradient. The parameter gradients equal `backward(loss_of(z))`'s when loss_of(z) is a sum of
    per-chain terms (pass a mean as loss_of(z_b) scaled by z_b's share). `backward` is the caller's (Lightning's
    `manual_backward`); `extra` (a KL term) joins the last backward. Returns the detached sum of the blocks' losses.
    Under DDP call it with rows=None: DDP reduces gradients on every backward."""
    size = chains_per_block(z, rows)
    if size >= z.shape[0]:
        loss = loss_of(z)
        backward(loss if extra is None else loss + extra)
        return loss.detach()
    leaf = z.detach().requires_grad_(z.requires_grad)
    total = z.new_zeros(())
    for zb in leaf.split(size):  # views of `leaf`: their gradients accumulate into leaf.grad
        loss = loss_of(zb)
        backward(loss)
        total += loss.detach()
    upstream = (z * leaf.grad).sum() if z.requires_grad and leaf.grad is not None else None  # chain rule into z(theta)
    if upstream is not None or extra is not None:
        backward(sum(t for t in (upstream, extra) if t is not None))  # type: ignore[arg-type]
    return total
