"""The quiet CPU Trainer of the tests that drive Lightning directly rather than through `latentlab-train`."""

from __future__ import annotations

import lightning.pytorch as L


def quiet_trainer(**kw: object) -> L.Trainer:
    """No logger, checkpoints, progress bar, model summary or sanity check, on the CPU; gradients allowed in
    validation and test (AIS and Langevin need them w.r.t. z: no inference mode); torch's deterministic-algorithms
    switch set off rather than left as an earlier test in the process set it. Keyword arguments override any of it."""
    args: dict = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                  "enable_model_summary": False, "accelerator": "cpu", "num_sanity_val_steps": 0,
                  "deterministic": False, "inference_mode": False}
    args.update(kw)
    return L.Trainer(**args)
