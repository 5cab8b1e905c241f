"""The hand-written VAE loop of `vae_mnist.py`, and the same loop as a script of its own.

`vae_mnist.py` imports `HandLoop` and runs it inside its own process, between latentlab's epochs: the
strictest baseline, since that process's heap is already laid out. Run as a script (what a researcher runs:
`python my_vae.py`, importing nothing but torch), it trains one epoch per "go" line on stdin and answers
`epoch <wall s> <cpu s> <mean loss> <minor page faults per step>`, as `pythae_vae.py` does. The page faults
are why the two differ: in a fresh process glibc serves each step's large tensors from fresh mmaps or from the
top of its heap, which it hands back to the OS when the step frees them, and the next step faults them in again
(the README's benchmark section: how a script avoids it).
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from typing import Any

import torch
from torch import nn

LATENT, BATCH, LR = 32, 128, 1e-3


def minor_faults() -> int:
    """Minor page faults of this process so far (memory the kernel had to map in again)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class PlainVAE(nn.Module):
    """The same network written by hand: what a researcher would write without a framework."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 2 * LATENT))
        self.dec = nn.Sequential(nn.Linear(LATENT, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 784))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        mu, log_var = self.enc(x).chunk(2, -1)
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
        recon = -nn.functional.binary_cross_entropy_with_logits(self.dec(z), x, reduction="none").sum(-1)
        kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum(-1)
        return -(recon - kl).mean()

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        logits = self.dec(z)
        lik = -nn.functional.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        return lik - 0.5 * (z.pow(2).sum(-1) + LATENT * math.log(2 * math.pi))

    def gaussian(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x)'s mean and log-variance."""
        mu, log_var = self.enc(x).chunk(2, -1)
        return mu, log_var


class HandLoop:
    """The hand-written loop; `epoch()` trains one epoch and returns (wall s, cpu s, mean loss, page faults a step).

    Given `init` (a PlainVAE state dict: latentlab's VAE before training), it starts from the same weights, so the
    two runs differ only in their shuffles and noise draws: their losses then differ by that noise alone, not also
    by the init (tested: with the same init, order and noise, latentlab's training is this loop bit for bit).
    """

    def __init__(self, x: torch.Tensor, device: torch.device, seed: int, init: dict[str, Any] | None = None) -> None:
        torch.manual_seed(seed)
        self.x, self.model = x, PlainVAE().to(device)
        if init is not None:
            self.model.load_state_dict(init)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=LR)

    def epoch(self) -> tuple[float, float, float, float]:
        wall, cpu, faults = time.perf_counter(), time.process_time(), minor_faults()
        perm, total = torch.randperm(self.x.shape[0], device=self.x.device), torch.zeros((), device=self.x.device)
        steps = math.ceil(self.x.shape[0] / BATCH)
        for i in range(0, self.x.shape[0], BATCH):
            self.opt.zero_grad(set_to_none=True)
            loss = self.model.loss(self.x[perm[i: i + BATCH]])
            loss.backward()
            self.opt.step()
            total += loss.detach()
        mean = float(total) / steps
        return time.perf_counter() - wall, time.process_time() - cpu, mean, (minor_faults() - faults) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a torch.save'd (N, 784) float tensor")
    parser.add_argument("--init", default=None, help="a torch.save'd PlainVAE state dict to start from")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    init = torch.load(args.init) if args.init else None
    loop = HandLoop(torch.load(args.data).to(device), device, args.seed, init)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        print("epoch " + " ".join(f"{v:.4f}" for v in loop.epoch()), flush=True)


if __name__ == "__main__":
    main()
