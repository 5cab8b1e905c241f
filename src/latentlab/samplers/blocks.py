"""Running many independent chains block by block: activations that stay in cache, blocks on every core.

ALMOND's E-step moves n_chains x batch chains through the decoder at once: 100 chains x 1000 examples on the
many-normal-means problem are 100k rows, and a 100-wide hidden layer over them is 40 MB, far beyond a CPU's
caches, so every matmul and activation streams from memory. Split along the chains dimension into blocks of
about `rows` rows, the same FLOPs run 1.3-3x faster on one core (benchmarks/normal_means_speed.py). The chains
are independent, so running the K moves block after block is the same Markov chain in law.

Blocks also run side by side: `workers` > 1 maps them over a pool of threads, each on one torch thread (torch
releases the GIL inside its kernels). For a small decoder that is what a second core can add: its 4000 x 100
matmuls hardly speed up with intra-op threads (1.1x on two), but two blocks at once run 1.75x faster
(benchmarks/normal_means_speed.py). On CPU each block draws its noise from its own generator, keyed by one draw
from the caller's, so a fixed-seed run gives the
same chains whatever the number of workers (though not the unblocked ones); on an accelerator, where workers is 1,
the blocks share the caller's generator (no seed read back to the host).

The contract: z has shape (n_chains, ..., d) and the target is the sum of per-chain terms whose other
operands broadcast against z's trailing dimensions (as `partial(model.log_joint, x)` with x (batch, D) does).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from torch import Tensor

from latentlab.samplers.langevin import LogProb, SamplerResult

Sample = Callable[..., SamplerResult]
T = TypeVar("T")


def resolve_workers(workers: int | str, device: torch.device) -> int:
    """`auto`: as many block workers as torch has threads, on CPU; one on an accelerator (its kernels are parallel)."""
    if workers == "auto":
        return torch.get_num_threads() if device.type == "cpu" else 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"block_workers must be an integer >= 1 or auto, got {workers!r}")
    return workers


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    """One pool per size for the process's life; its threads run torch single-threaded (no oversubscription)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="latentlab-blocks", initializer=torch.set_num_threads,
                              initargs=(1,))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_pool.cache_clear)  # a forked child has none of the parent's threads


def map_blocks(fn: Callable[..., T], args: Iterable[Sequence[Any]], workers: int) -> list[T]:
    """[fn(*a) for a in args], on `workers` threads when > 1, in order; the caller's grad mode and autocast
    state (thread-local in torch) hold in the workers too."""
    items = list(args)
    if workers <= 1 or len(items) <= 1:
        return [fn(*a) for a in items]
    grad = torch.is_grad_enabled()
    autocast = torch.is_autocast_enabled("cpu")
    dtype = torch.get_autocast_dtype("cpu")

    def call(a: Sequence[Any]) -> T:
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=dtype, enabled=autocast):
            return fn(*a)

    return list(_pool(min(workers, len(items))).map(call, items))


def block_generators(generator: torch.Generator | None, like: Tensor, n: int) -> list[torch.Generator | None]:
    """n generators for n blocks of `like`: on CPU, independent ones seeded by one draw of n seeds from `generator`
    (the global RNG when None), so that threads cannot reorder the draws; elsewhere the caller's, shared in turn."""
    if like.device.type != "cpu" or (generator is not None and generator.device.type != "cpu"):
        return [generator] * n
    seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


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
    diagnostics (means over chains) weighted by block size; 0-d tensors stay tensors (no host read per block)."""
    if len(results) == 1:
        return results[0]
    total = sum(sizes)
    diagnostics: dict[str, float | Tensor] = {}
    for key, first in results[0].diagnostics.items():
        values = [r.diagnostics[key] for r in results]
        if isinstance(first, Tensor) and first.dim() > 0:
            diagnostics[key] = torch.cat(values)  # type: ignore[arg-type]
        elif key.startswith("n_"):  # floats or 0-d device tensors, summed without reading them back
            diagnostics[key] = sum(values[1:], values[0])
        else:
            diagnostics[key] = sum((v * s for v, s in zip(values, sizes, strict=True)), 0.0) / total
    samples = None if results[0].samples is None else torch.cat([r.samples for r in results], 1)  # type: ignore[misc]
    counts = None if results[0].step_count is None else torch.cat([r.step_count for r in results])  # type: ignore[misc]
    return SamplerResult(torch.cat([r.z for r in results]), torch.cat([r.step_size for r in results]), samples,
                         diagnostics, counts)


def sample_in_blocks(sample: Sample, log_prob: LogProb, z0: Tensor, rows: int | None, generator: torch.Generator | None = None,
                     *, step_size: float | Tensor | None = None, step_count: Tensor | None = None,
                     keep_samples: bool = False, workers: int = 1) -> SamplerResult:
    """`sample(log_prob, z0, generator, ...)` (a sampler's bound `sample`) run on blocks of about `rows` rows of z0's
    chains, `workers` at a time, each with its own generator (`block_generators`), merged into one result."""
    size = chains_per_block(z0, rows)
    if size >= z0.shape[0]:
        return sample(log_prob, z0, generator, keep_samples=keep_samples, step_size=step_size, step_count=step_count)
    blocks = z0.split(size)

    def run(zb: Tensor, gen: torch.Generator | None, s: float | Tensor | None, c: Tensor | None) -> SamplerResult:
        return sample(log_prob, zb, gen, keep_samples=keep_samples, step_size=s, step_count=c)

    args = zip(blocks, block_generators(generator, z0, len(blocks)), _split(step_size, z0, size),
               _split(step_count, z0, size), strict=True)
    return _merge(map_blocks(run, args, workers), [b.shape[0] for b in blocks])


def backward_in_blocks(loss_of: Callable[[Tensor], Tensor], z: Tensor, rows: int | None,
                       backward: Callable[[Tensor], None], extra: Tensor | None = None, *,
                       params: Iterable[Tensor] = (), workers: int = 1) -> Tensor:
    """sum_b loss_of(z_b) over blocks of z's chains, back-propagated one block at a time (each block's activations
    freed before the next is built), and through z's own graph (an encoder's reparameterisation) once, with the
    blocks' summed gradient. The parameter gradients equal `backward(loss_of(z))`'s when loss_of(z) is a sum of
    per-chain terms (pass a mean as loss_of(z_b) scaled by z_b's share). `backward` is the caller's (Lightning's
    `manual_backward`); `extra` (a KL term) joins the last backward. Returns the detached sum of the blocks' losses.
    `workers` > 1: the blocks' gradients w.r.t. `params` (all the losses may reach) are taken on that many threads
    and summed in block order, the same sums one backward per block accumulates; `backward` then runs once.
    Under DDP call it with rows=None: DDP reduces gradients on every backward."""
    size = chains_per_block(z, rows)
    if size >= z.shape[0]:
        loss = loss_of(z)
        backward(loss if extra is None else loss + extra)
        return loss.detach()
    if workers > 1:
        return _parallel_backward(loss_of, z, size, backward, extra, [p for p in params if p.requires_grad], workers)
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


def _parallel_backward(loss_of: Callable[[Tensor], Tensor], z: Tensor, size: int, backward: Callable[[Tensor], None],
                       extra: Tensor | None, params: list[Tensor], workers: int) -> Tensor:
    """`backward_in_blocks` on threads: per-block `autograd.grad`, summed in order, then one `backward` of
    sum(p * g) + z . dz + extra, whose gradient w.r.t. each p is exactly its g (and flows on into z's graph)."""
    def grads(zb: Tensor) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        leaf = zb.detach().requires_grad_(z.requires_grad)
        loss = loss_of(leaf)
        inputs = [*params, leaf] if z.requires_grad else params
        gs = torch.autograd.grad(loss, inputs, allow_unused=True) if inputs else ()
        if z.requires_grad and gs[-1] is None:  # a loss that ignores z: no gradient into z's graph
            gs = (*gs[:-1], torch.zeros_like(leaf))
        return loss.detach(), gs

    results = map_blocks(grads, [(zb,) for zb in z.split(size)], workers)
    total = z.new_zeros(())
    sums: list[Tensor | None] = [None] * (len(params) + int(z.requires_grad))
    for loss, gs in results:
        total += loss
        for i, g in enumerate(gs):
            if g is not None and i < len(params):
                sums[i] = g if sums[i] is None else sums[i] + g  # type: ignore[operator]
    terms = [(p * g).sum() for p, g in zip(params, sums, strict=False) if g is not None]
    if z.requires_grad:
        terms.append((z * torch.cat([gs[-1] for _, gs in results])).sum())  # type: ignore[misc]
    if extra is not None:
        terms.append(extra)
    if terms:
        backward(sum(terms))  # type: ignore[arg-type]
    return total
