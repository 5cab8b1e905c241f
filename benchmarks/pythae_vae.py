"""pythae 0.1.2's VAE on the same tensors, one epoch per "go" line on stdin: the third column of vae_mnist.py.

Run by `benchmarks/vae_mnist.py --pythae-python PATH` with the interpreter of a virtual environment that
has pythae (it is not a latentlab dependency). The parent sends "go" before each of its own epochs, so
the three loops take turns epoch by epoch on the shared machine. Each epoch answers one line:
`epoch <wall seconds> <cpu seconds> <mean training loss> <minor page faults per step>`; the timed span is pythae's own epoch
(on_epoch_begin to on_epoch_end: its train_step over the loader and its copy of the best model).
With `--nll-k K` it times `get_nll(data, K)` instead (estimators_speed.py) and prints `nll_seconds S`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from torch import nn

from hand_vae import minor_faults  # this script's folder is on sys.path
from scratch import scratch_dir
from pythae.data.datasets import BaseDataset
from pythae.models import VAE, VAEConfig
from pythae.models.base.base_utils import ModelOutput
from pythae.models.nn import BaseDecoder, BaseEncoder
from pythae.trainers import BaseTrainer, BaseTrainerConfig
from pythae.trainers.training_callbacks import TrainingCallback


class Encoder(BaseEncoder):
    """784-512-512-(2 x latent), as latentlab's net=mlp_large."""

    def __init__(self, latent: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 2 * latent))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        mu, log_var = self.net(x.reshape(x.shape[0], -1)).chunk(2, -1)
        return ModelOutput(embedding=mu, log_covariance=log_var)


class Decoder(BaseDecoder):
    """latent-512-512-784 with sigmoid outputs (pythae's "bce" loss takes probabilities)."""

    def __init__(self, latent: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 784))

    def forward(self, z: torch.Tensor) -> ModelOutput:
        return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))


class Turns(TrainingCallback):
    """Wait for the parent's "go" before each epoch and report the epoch's times after it."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_epoch_begin(self, training_config: BaseTrainerConfig, **kwargs: object) -> None:
        if sys.stdin.readline().strip() != "go":
            raise SystemExit(0)
        self.wall, self.cpu, self.faults = time.perf_counter(), time.process_time(), minor_faults()

    def on_epoch_end(self, training_config: BaseTrainerConfig, **kwargs: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        self.faults = (minor_faults() - self.faults) / self.steps

    def on_log(self, training_config: BaseTrainerConfig, logs: dict, **kwargs: object) -> None:
        loss = float(logs.get("train_epoch_loss", float("nan")))
        print(f"epoch {self.wall:.4f} {self.cpu:.4f} {loss:.4f} {self.faults:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="a torch.save'd (N, 784) float tensor")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--nll-k", type=int, default=0, help=">0: time get_nll(data, k) instead of training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x = torch.load(args.data)
    model = VAE(VAEConfig(input_dim=(784,), latent_dim=args.latent, reconstruction_loss="bce"),
                encoder=Encoder(args.latent), decoder=Decoder(args.latent))
    if args.nll_k:
        start = time.perf_counter()
        with torch.no_grad():
            model.get_nll(x, n_samples=args.nll_k, batch_size=100)
        print(f"nll_seconds {time.perf_counter() - start:.4f}", flush=True)
        return
    config = BaseTrainerConfig(output_dir=str(scratch_dir("pythae-")), num_epochs=args.epochs,
                               learning_rate=args.lr, per_device_train_batch_size=args.batch, optimizer_cls="Adam",
                               steps_saving=None, keep_best_on_train=True, seed=args.seed,
                               no_cuda=args.device == "cpu")
    trainer = BaseTrainer(model=model, train_dataset=BaseDataset(x, torch.zeros(len(x))), training_config=config,
                          callbacks=[Turns(math.ceil(len(x) / args.batch))])
    print("ready", flush=True)
    trainer.train()


if __name__ == "__main__":
    main()
