"""Seconds per epoch of latentlab's VAE against a plain PyTorch loop of the same model, same process.

    python benchmarks/vae_mnist.py --data-dir ../shared/data --epochs 3

Model: the 784-512-512-(2x32) MLP VAE with a Bernoulli decoder (512-512-784), Adam 1e-3, batch 100,
MNIST 55k training images (grey values as Bernoulli targets). Both loops see the same tensors; the
plain loop slices them directly (the floor). Plain epochs run before, between and after the latentlab
runs (each one `fit` of all its epochs, as a user's run), so slow phases of the shared machine show in both;
the table shows medians and the ratio (goal: <= 1.10). "lean" drops the safety nets (atomic checkpoints,
RNG-state saving, NaN guard, logger) to show what they cost.
Then the test NLL (importance sampling, k=1000, first 1000 test images) of both models.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as L
import torch
from torch import nn

from latentlab.models import VAE

from latentlab.builders import build_callbacks, build_datamodule, build_loggers, build_model, build_trainer, compose_config, resolve_paths
from latentlab.metrics.loglik import importance_sampling_log_likelihood
from latentlab.models import VAE

LATENT, HIDDEN, BATCH, LR = 32, [512, 512], 100, 1e-3


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
        x = x.expand_as(logits)
        lik = -nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        return lik - 0.5 * (z.pow(2).sum(-1) + LATENT * math.log(2 * math.pi))

    def proposal(self, x: torch.Tensor) -> torch.distributions.Distribution:
        mu, log_var = self.enc(x).chunk(2, -1)
        return torch.distributions.Independent(torch.distributions.Normal(mu, torch.exp(0.5 * log_var)), 1)


def plain_epoch(model: PlainVAE, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    start = time.perf_counter()
    perm = torch.randperm(x.shape[0])
    for i in range(0, x.shape[0], BATCH):
        opt.zero_grad(set_to_none=True)
        loss = model.loss(x[perm[i: i + BATCH]])
        loss.backward()
        opt.step()
    return time.perf_counter() - start


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.times.append(time.perf_counter() - self._t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-subset", type=int, default=None, help="fewer training images (quick runs)")
    parser.add_argument("--nll-k", type=int, default=1000)
    parser.add_argument("--nll-n", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # latentlab exactly as `latentlab-train` builds it (default callbacks: atomic checkpoints every epoch,
    # RNG-state saving, the NaN guard; CSV logger), minus validation and the terminal progress bar; and a
    # "lean" variant without those safety nets, so the table shows what they cost.
    common = [
        "data=mnist", f"paths.data_dir={Path(args.data_dir).resolve()}", "data.binarize=none", f"data.batch_size={BATCH}",
        "net=mlp_large", f"model.latent_dim={LATENT}", f"model.optimizer.lr={LR}", f"model.eval.k={args.nll_k}",
        "callbacks.progress_bar=null", "callbacks.image_grid=null", "callbacks.model_summary=null", "+trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0", "trainer.enable_model_summary=false", "+trainer.enable_progress_bar=false",
        *([f"+data.train_subset={args.train_subset}"] if args.train_subset else []),
    ]
    lean = ["callbacks.model_checkpoint=null", "callbacks.random_state=null", "callbacks.numerics=null", "logger=none",
            "+trainer.enable_checkpointing=false", "trainer.deterministic=false"]
    variants: dict[str, tuple[L.Trainer, VAE, EpochTimer]] = {}
    for name, extra in (("latentlab", []), ("lean", lean)):
        cfg = compose_config(common + extra, output_dir=Path(tempfile.mkdtemp(prefix="latentlab-bench-")))
        resolve_paths(cfg)
        dm = build_datamodule(cfg)
        dm.prepare_data()
        dm.setup("fit")
        timer = EpochTimer()
        variants[name] = (build_trainer(cfg, [*build_callbacks(cfg), timer], build_loggers(cfg)), build_model(cfg, dm), timer)
    x_train = torch.cat([b[0] for b in dm.train_dataloader()])  # the very tensors latentlab trains on

    plain = PlainVAE()
    plain_opt = torch.optim.Adam(plain.parameters(), lr=LR)
    plain_times: list[float] = []
    plain_times.append(plain_epoch(plain, plain_opt, x_train))  # warm-up epoch for the allocator, counted
    for trainer, model, _ in variants.values():  # each trains as a user's run does: one fit, all epochs
        plain_times.append(plain_epoch(plain, plain_opt, x_train))
        trainer.fit_loop.max_epochs = args.epochs
        trainer.fit(model, datamodule=dm)
    plain_times.append(plain_epoch(plain, plain_opt, x_train))

    p = statistics.median(plain_times)
    print(f"\nVAE 784-512-512-(2x{LATENT}) on MNIST ({x_train.shape[0]} images, batch {BATCH}, {args.threads} threads)")
    print(f"{'loop':<12}{'epochs':>8}{'s/epoch (median)':>20}{'ratio':>8}")
    print(f"{'plain torch':<12}{len(plain_times):>8}{p:>20.2f}{1.0:>8.2f}")
    for name, (_, _, timer) in variants.items():
        t = statistics.median(timer.times)
        note = "   goal <= 1.10" if name == "latentlab" else "   no checkpoints, NaN guard, logger"
        print(f"{name:<12}{len(timer.times):>8}{t:>20.2f}{t / p:>8.2f}{note}")
    model = variants["latentlab"][1]

    x_test = torch.cat([b[0] for b in dm.test_dataloader()])[: args.nll_n]
    model.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        nll_lab = -model.log_px(x_test).mean().item()
        torch.manual_seed(1)
        nll_plain = -importance_sampling_log_likelihood(plain.log_joint, plain.proposal(x_test), x_test,
                                                        k=args.nll_k, chunk_size=100).mean().item()
    print(f"\ntest NLL (IS, k={args.nll_k}, first {x_test.shape[0]} test images) after {args.epochs} epochs:")
    print(f"  latentlab {nll_lab:.2f} nats   plain {nll_plain:.2f} nats")


if __name__ == "__main__":
    main()
