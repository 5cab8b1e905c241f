"""The default optimiser is the fused kernel, which must give the same training as PyTorch's loop."""

from __future__ import annotations

import functools

import torch
from torch import nn

from latentlab.optim import build_optimizer


def _train(factory, steps: int = 20) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = build_optimizer(factory, net.parameters())
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 6, generator=gen)
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    return net, opt


def test_fused_by_default_and_same_parameters_as_the_loop() -> None:
    fused_net, fused_opt = _train(functools.partial(torch.optim.Adam, lr=1e-2))
    loop_net, loop_opt = _train(functools.partial(torch.optim.Adam, lr=1e-2, foreach=False))
    assert fused_opt.defaults["fused"] is True and not loop_opt.defaults["fused"]
    for a, b in zip(fused_net.parameters(), loop_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_explicit_choice_and_optimisers_without_fused_kernel_are_kept() -> None:
    net = nn.Linear(3, 3)
    assert not build_optimizer(functools.partial(torch.optim.Adam, fused=False), net.parameters()).defaults["fused"]
    assert build_optimizer(functools.partial(torch.optim.RMSprop, lr=1e-3), net.parameters()).defaults.get("fused") is None
    groups = build_optimizer(torch.optim.Adam, [{"params": net.parameters(), "lr": 0.1}]).param_groups
    assert len(groups[0]["params"]) == 2 and groups[0]["lr"] == 0.1
