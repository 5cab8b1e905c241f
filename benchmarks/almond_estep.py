"""What ALMOND's E-step and epoch cost, measured side by side in one process.

    python benchmarks/almond_estep.py --data-dir ../shared/data            # ~1 minute on one CPU thread
    python benchmarks/almond_estep.py --net conv --chains 20 --steps 5 --batch 200 --device cuda  # the paper's MNIST

1. One E-step: `ALMOND.e_step` (K Langevin moves of n_chains x batch chains through the shared sampler,
   plus reading and writing the persistent chains) next to the floor: the same K moves written by hand,
   z <- z + s grad log p(x, z) + sqrt(2 s) xi with one decoder forward + backward each. Goal: <= 1.15x.
2. One training epoch of ALMOND (Langevin phase: E-step + M-step per batch) next to one epoch of the VAE
   with the same decoder on the same MNIST subset (`--train-subset`), through Lightning both.
Repeats alternate between the two sides so the shared machine's noise hits both alike; medians shown.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import lightning.pytorch as L
import torch
import torch.nn.functional as F

from latentlab.data import MNISTDataModule
from latentlab.models import ALMOND, VAE
from latentlab.samplers import ULA


def hand_written_ula(decoder: torch.nn.Module, x: torch.Tensor, z: torch.Tensor, step: float, n_steps: int,
                     generator: torch.Generator) -> torch.Tensor:
    """The floor: K forward+backward passes of the decoder w.r.t. z and the Langevin update, nothing else."""
    noise = math.sqrt(2.0 * step)
    for _ in range(n_steps):
        z = z.detach().requires_grad_(True)
        logits = decoder(z.reshape(-1, z.shape[-1])).reshape(*z.shape[:-1], -1)
        log_joint = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        log_joint = log_joint - 0.5 * z.pow(2).sum(-1)
        (grad,) = torch.autograd.grad(log_joint.sum(), z)
        z = z.detach() + step * grad + noise * torch.randn(z.shape, generator=generator, device=z.device)
    return z


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


class EpochTimer(L.Callback):
    """Seconds from the first to the last batch of each training epoch (no trainer set-up)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def row(name: str, seconds: float, floor: float, note: str = "") -> str:
    return f"{name:<34}{seconds * 1e3:>14.1f}{seconds / floor:>9.2f}  {note}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--net", choices=["mlp", "conv"], default="mlp", help="mlp: 512-512; conv: the conv nets")
    parser.add_argument("--latent-dim", type=int, default=20)
    parser.add_argument("--chains", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5, help="Langevin moves per E-step (K)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--step-size", type=float, default=0.02)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per method in part 2 (median)")
    parser.add_argument("--train-subset", type=int, default=2000, help="MNIST training images in part 2")
    parser.add_argument("--threads", type=int, default=1, help="1: a shared machine makes 2+ threads spin")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    net = {"kind": "mlp", "hidden_dims": [512, 512]} if args.net == "mlp" else \
        {"kind": "conv", "channels": [32, 64], "hidden_dims": [256]}

    dm = MNISTDataModule(data_dir=args.data_dir, batch_size=args.batch, val_size=0, train_subset=args.train_subset,
                         binarize="none")
    dm.prepare_data()
    dm.setup("fit")
    common = dict(data_dim=784, latent_dim=args.latent_dim, image_shape=(1, 28, 28), net=net)
    almond = ALMOND(**common, n_chains=args.chains, sampler=ULA(args.step_size, args.steps),
                    step_size_decay=False, num_train=dm.num_train).to(device)

    # ----- 1. one E-step against the hand-written floor ----------------------------------------------
    x, index = dm.data("train")[: args.batch].to(device), torch.arange(args.batch, device=device)
    z0 = torch.randn(args.chains, args.batch, args.latent_dim, device=device)
    decoder = almond.model.decoder
    gen = torch.Generator(device=device)
    floor_t, estep_t = [], []
    almond.e_step(x, index, gen.manual_seed(0))  # warm-up: allocator, first-visit initialisation
    hand_written_ula(decoder, x, z0, args.step_size, args.steps, gen.manual_seed(0))
    for r in range(args.repeats):
        sides = [("floor", lambda: hand_written_ula(decoder, x, z0, args.step_size, args.steps, gen.manual_seed(r))),
                 ("estep", lambda: almond.e_step(x, index, gen.manual_seed(r)))]
        for name, fn in sides if r % 2 == 0 else sides[::-1]:
            (floor_t if name == "floor" else estep_t).append(timed(fn, device))
    floor, estep = statistics.median(floor_t), statistics.median(estep_t)
    points = args.chains * args.batch
    print(f"\nE-step: {args.chains} chains x batch {args.batch} = {points} points, K = {args.steps} ULA moves, "
          f"{args.net} decoder, latent {args.latent_dim}, {device} ({args.threads} threads), {args.repeats} repeats")
    print(f"{'':<34}{'ms (median)':>14}{'ratio':>9}")
    print(row("hand-written ULA (floor)", floor, floor))
    print(row("ALMOND.e_step (sampler + chains)", estep, floor, "goal <= 1.15"))

    # ----- 2. one epoch of ALMOND (Langevin phase) against one epoch of the VAE -----------------------
    vae = VAE(**common)
    almond_epoch = ALMOND(**common, n_chains=args.chains, sampler=ULA(args.step_size, args.steps))
    timers = {"vae": EpochTimer(), "almond": EpochTimer()}
    trainers = {name: L.Trainer(max_epochs=0, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                                callbacks=[timer]) for name, timer in timers.items()}
    models = {"vae": vae, "almond": almond_epoch}
    for epoch in range(args.epochs):
        for name in ("vae", "almond") if epoch % 2 == 0 else ("almond", "vae"):
            trainers[name].fit_loop.max_epochs = epoch + 1
            trainers[name].fit(models[name], datamodule=dm)
    v, a = statistics.median(timers["vae"].times), statistics.median(timers["almond"].times)
    print(f"\nOne epoch, {dm.num_train} MNIST images, batch {args.batch}, {args.epochs} epochs each (median):")
    print(f"{'':<34}{'s/epoch':>14}{'ratio':>9}")
    print(f"{'VAE (same decoder + encoder)':<34}{v:>14.2f}{1.0:>9.2f}")
    print(f"{'ALMOND (Langevin phase)':<34}{a:>14.2f}{a / v:>9.2f}  "
          f"~ {args.chains} chains x ({args.steps} E + 1 M) decoder passes per example")


if __name__ == "__main__":
    main()
