"""torch's process-wide switches a run sets: the NaN fill of new tensors under deterministic algorithms, and
flushing subnormal floats to zero in every CPU thread torch computes on."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import lightning.pytorch as L
import torch

_TEAM_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # void fn(void *data): what an OpenMP team runs in each thread


def flushing_denormals() -> bool:
    """Whether the calling thread flushes subnormals to zero: a subnormal halved reads back as 0 only then."""
    return bool(torch.tensor(1e-39, dtype=torch.float32) * 0.5 == 0)  # a one-element op runs on the calling thread


@lru_cache(maxsize=1)
def _openmp_parallel() -> Any:
    """`GOMP_parallel` of the OpenMP runtime torch's CPU kernels run on (GNU's, or Intel's, which speaks GNU's ABI),
    or None. Looked up through libtorch_cpu's own handle, which searches its dependencies: another package's
    vendored OpenMP (scikit-learn ships one) has its own threads."""
    if not sys.platform.startswith("linux"):
        return None
    with open("/proc/self/maps") as maps:
        libtorch = next((line.split()[-1] for line in maps if line.rstrip().endswith("/libtorch_cpu.so")), None)
    return getattr(ctypes.CDLL(libtorch), "GOMP_parallel", None) if libtorch else None


def set_flush_denormal_everywhere(on: bool) -> bool:
    """`torch.set_flush_denormal(on)` in the calling thread and in each thread of torch's OpenMP team; False where
    the CPU cannot flush (then nothing changes).

    The flag (x86's FTZ/DAZ) lives in each thread's MXCSR register and `torch.set_flush_denormal` sets only the
    caller's: the OpenMP worker threads torch's kernels split their work over keep theirs, and the slowest thread
    sets the pace. So the flag is also set from inside one OpenMP parallel region, where each thread of the team runs
    it for itself (threads the runtime creates later inherit the creating thread's flag).
    """
    if not torch.set_flush_denormal(on):
        return False
    if (parallel := _openmp_parallel()) is not None and torch.get_num_threads() > 1:
        def in_each_thread(_: Any) -> None:
            torch.set_flush_denormal(on)

        parallel(_TEAM_FN(in_each_thread), None, ctypes.c_uint(torch.get_num_threads()), ctypes.c_uint(0))
    return True


class TorchSwitches(L.Callback):
    """Sets torch's process-wide switches where the Trainer runs, in every process it uses.

    - `fill`: `torch.utils.deterministic.fill_uninitialized_memory`. `build_trainer` (and latentlab-cli) set it in
      the calling process, but the processes `ddp_spawn` starts get only what Lightning carries over (the
      deterministic switch, not this flag): without this they NaN-filled every new tensor again, ~4% of a step on
      CPU. `setup` runs in each of them before any step.
    - `flush_denormal`: subnormal floats (below 1.2e-38 in float32) are read and written as zero in every CPU thread
      from `setup` to `teardown` (then the caller's setting is back). On an Intel CPU each operation on a subnormal
      takes a microcode assist of ~100 cycles: Adam's first moment of the weights on MNIST's rarely-inked border
      pixels decays by 0.9 a step into the subnormal range and stays there (0.9 x the smallest subnormal rounds back
      to it), a fifth of its entries by step 2,000, and the fused Adam step then took 4.2 ms instead of 0.7 (2
      threads, 2026-12-07). An update from such a moment is below 1e-33 x lr, far below what changes a float32
      weight: 3,000 steps of the MNIST VAE gave the same losses and weights bit for bit (README, Benchmarks).
      TensorFlow flushes them in its threads by default too.
    """

    def __init__(self, fill: bool, flush_denormal: bool = True) -> None:
        self.fill, self.flush_denormal = bool(fill), bool(flush_denormal)
        self._flushing_before: bool | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "TorchSwitches":
        """From a run config's top level (latentlab-train's, latentlab-eval's or latentlab-cli's), with their defaults:
        `fill_uninitialized_memory` false, `flush_denormal` true."""
        return cls(config.get("fill_uninitialized_memory", False), config.get("flush_denormal", True))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        torch.utils.deterministic.fill_uninitialized_memory = self.fill
        if self.flush_denormal and self._flushing_before is None:
            self._flushing_before = flushing_denormals()
            set_flush_denormal_everywhere(True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()  # a run that raises gets no `teardown` from Lightning

    def _restore(self) -> None:
        if self._flushing_before is not None:
            set_flush_denormal_everywhere(self._flushing_before)
            self._flushing_before = None
