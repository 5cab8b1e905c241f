"""Optimisers from config partials, with the fast exact implementation chosen by default (and ALMOND's M-step
schedule, `inverse_sqrt_lr`).

PyTorch's Adam/AdamW/SGD/Adagrad default to a per-parameter Python loop on CPU (`foreach` is only the
default on CUDA). Their `fused=True` kernels do the same update in one pass over each parameter, on
CPU and CUDA: on the 784-512-512-(2x32) VAE an Adam step takes about 0.9 ms instead of 5 ms on one core,
a fifth of a training step (see `benchmarks/vae_mnist.py --breakdown`). Same algorithm, same state_dict
layout; the parameters agree with the loop's to float rounding (3e-7 after 20 steps).

A user's explicit `fused` or `foreach` (e.g. `+model.optimizer.fused=false`) is always kept.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from latentlab.errors import ConfigError

#: devices whose fused optimiser kernels PyTorch ships
FUSED_DEVICES = ("cpu", "cuda")


def _accepts(factory: Callable[..., Any], name: str) -> bool:
    target = factory.func if isinstance(factory, functools.partial) else factory
    try:
        return name in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def _given(factory: Callable[..., Any], name: str) -> bool:
    return isinstance(factory, functools.partial) and name in (factory.keywords or {})


def build_optimizer(factory: Callable[..., torch.optim.Optimizer], params: Iterable[Any]) -> torch.optim.Optimizer:
    """`factory(params)`, plus `fused=True` when the optimiser has a fused kernel for these parameters
    (float tensors on CPU or CUDA, all on one device type) and the config chose neither `fused` nor `foreach`."""
    params = [{**g, "params": list(g["params"])} if isinstance(g, dict) else g for g in params]
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    fusable = (
        bool(tensors)
        and _accepts(factory, "fused")
        and not _given(factory, "fused")
        and not _given(factory, "foreach")
        and len({p.device.type for p in tensors}) == 1
        and tensors[0].device.type in FUSED_DEVICES
        and all(p.is_floating_point() for p in tensors)
    )
    if not fusable:
        return factory(params)
    try:
        return factory(params, fused=True)
    except (RuntimeError, TypeError, ValueError):  # e.g. a dtype or option the fused kernel refuses
        return factory(params)


def lightning_optimizers(factory: Callable[..., torch.optim.Optimizer], scheduler_factory: Callable[..., Any] | None,
                         params: Iterable[Any]) -> Any:
    """What `configure_optimizers` returns for one optimiser and an optional per-epoch scheduler, for every
    single-optimiser module (the latent base, the denoiser)."""
    optimizer = build_optimizer(factory, params)
    if scheduler_factory is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler_factory(optimizer), "interval": "epoch"}}


def inverse_sqrt_lr(optimizer: torch.optim.Optimizer, warmup_epochs: int = 0) -> LambdaLR:
    """lr_e = lr_0 for the first `warmup_epochs` epochs, then lr_0 / sqrt(e - warmup_epochs + 1):
    the Robbins-Monro-type rate of the paper's M-step (its `fit_bc`). Stepped once per Langevin epoch."""
    if warmup_epochs < 0:
        raise ConfigError(f"inverse_sqrt_lr warmup_epochs must be >= 0, got {warmup_epochs}")
    return LambdaLR(optimizer, lambda e: 1.0 if e < warmup_epochs else 1.0 / math.sqrt(e - warmup_epochs + 1.0))
