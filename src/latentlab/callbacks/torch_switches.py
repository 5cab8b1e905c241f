"""torch's NaN fill of new tensors under deterministic algorithms, set in every process a run uses."""

from __future__ import annotations

import lightning.pytorch as L
import torch


class FillSwitch(L.Callback):
    """Sets `torch.utils.deterministic.fill_uninitialized_memory` where the Trainer runs.

    `build_trainer` (and latentlab-cli) set it in the calling process, but the processes `ddp_spawn` starts get only
    what Lightning carries over (the deterministic switch, not this flag): without this they NaN-filled every new
    tensor again, ~4% of a step on CPU. `setup` runs in each of them before any step.
    """

    def __init__(self, fill: bool) -> None:
        self.fill = bool(fill)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        torch.utils.deterministic.fill_uninitialized_memory = self.fill
