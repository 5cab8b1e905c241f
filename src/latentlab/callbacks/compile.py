"""`torch.compile` as a config switch: compile a method's networks in place when training starts.

    latentlab-train trainer=gpu callbacks.compile.components=null          # every network
    latentlab-train callbacks.compile.components=[decoder]                   # just the decoder

Which networks: the method's named `components()` (decoder, encoder, discriminator; ALMOND's warm-up encoder).
`nn.Module.compile` wraps each module's forward and keeps its parameters and state_dict keys, so checkpoints
are the same as without compiling and `latentlab-eval` loads them uncompiled.

Where it pays and where it does not:
- Off by default (`components: []`): on a CPU the MLP VAE is matmul-bound and compiling the encoder and
  decoder (inductor, static shapes) left a training step where it was (16.5-17.5 ms vs 15.8-20 ms CPU time
  per step on one core, 784-512-512-(2x32), batch 128; issue 14), while the compilation itself costs seconds
  to a minute. The exact wins there are the fused optimiser (`latentlab.optim`) and fewer host reads.
- VAE and AVB training call each network with one batch shape per step: compiled once, then fast.
- ALMOND's Langevin E-step and AIS/IS evaluation call the decoder with extra leading dimensions
  (chains x batch, k x batch) that change between training, the E-step and evaluation chunks. Dynamo then
  recompiles; with `dynamic: true` (the default here) it compiles shape-generic code after the first
  recompile, but each new rank of input still costs a compilation, and past `torch._dynamo.config.cache_size_limit`
  recompiles it silently falls back to eager. Profile before relying on it for ALMOND.
- Gradients w.r.t. z (`torch.autograd.grad` in the samplers) go through compiled graphs fine; double backward
  (not used by latentlab today) is not supported by compiled graphs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as L

from latentlab.errors import ConfigError

log = logging.getLogger("latentlab")


class CompileNetworks(L.Callback):
    """Compile `components` (None: all of the method's networks; []: none, the switch off) with
    `torch.compile(mode, backend, dynamic)` at `setup`, in every process (compiled functions are not pickled
    across DDP spawns)."""

    def __init__(self, components: Sequence[str] | None = None, mode: str | None = None, backend: str = "inductor",
                 dynamic: bool | None = True, fullgraph: bool = False) -> None:
        self.components = list(components) if components is not None else None
        self.options = {"mode": mode, "backend": backend, "dynamic": dynamic, "fullgraph": fullgraph}
        self.compiled: list[str] = []

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        if self.compiled:
            return
        parts = pl_module.components()
        names = self.components if self.components is not None else list(parts)
        unknown = sorted(set(names) - set(parts))
        if unknown:
            raise ConfigError(f"callbacks.compile.components: {type(pl_module).__name__} has no {unknown}; "
                              f"it has {sorted(parts)}")
        for name in names:
            parts[name].compile(**self.options)
            self.compiled.append(name)
        if self.compiled:
            log.info("torch.compile (%s): %s", self.options["backend"], ", ".join(self.compiled))
