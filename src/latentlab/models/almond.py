"""ALMOND (Qiu & Wang 2020): stochastic EM with a Langevin E-step and no encoder.

The model is latentlab's one `GenerativeModel`: x | z ~ f_theta(x | h_eta(z)), z ~ pi_0 = N(0, I). Phases:

1. VAE warm-up (`vae_epochs`, optional, as in the paper): the shared `GaussianEncoder` + decoder on the ELBO.
2. Langevin EM, one iteration of the paper's algorithm per mini-batch:
   - E-step: move `n_chains` persistent chains per example (`PersistentChains`) by the configured sampler
     (`conf/sampler/`: ULA as the paper, or MALA) targeting p(z | x) under the current parameters; ULA's
     step decays per Langevin epoch e as s_e = max(s/10, s/sqrt(e+1)) (the paper's `fit_bc`);
   - M-step: one optimiser step on the Monte Carlo E[log f(x | h(z))] over the chains; the first
     `mstep_warmup_epochs` use `mstep_warmup_optimizer` (the paper: Adam), then `optimizer` with `scheduler`
     (the paper: SGD at lr / sqrt(e - warmup + 1), `inverse_sqrt_lr`).

`posterior(x, index)` (models/almond_posterior.py): the persistent chains of training examples; fresh chains for anything else (started at
the warm-up encoder or the prior, `eval_langevin_steps` moves). No density: the evaluator runs IS from a
kernel mixture of its draws (<= 2-d) or AIS from a Gaussian fitted to them, and its bound is that Gaussian's
ELBO. All noise comes from `latentlab.rng` streams keyed on (seed, purpose, rank, epoch, batch): a resumed run
draws what the uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
import warnings
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from latentlab.decoder_table import DecoderTable
from latentlab.errors import CheckpointError, ConfigError, NumericalError
from latentlab.models.base import LatentVariableModel, LikelihoodSpec, OptimizerFactory, SchedulerFactory, check_optimizer_factory
from latentlab.models.almond_posterior import ChainsPosterior
from latentlab.models.chains import PersistentChains, first_occurrences
from latentlab.nets import NetSpec
from latentlab.nets.gaussian import GaussianEncoder, elbo_terms
from latentlab.optim import build_optimizer, inverse_sqrt_lr  # inverse_sqrt_lr: the configs' target here
from latentlab.posterior import reparameterized
from latentlab.rng import Stream, keyed_generator
from latentlab.samplers import LangevinSampler, sampler_preset
from latentlab.samplers.blocks import backward_in_blocks, resolve_workers, sample_in_blocks

log = logging.getLogger("latentlab")
CHAIN_INITS = ("auto", "prior", "encoder")
# activation floats per block for block_rows=auto (1.6 MB): the many-normal-means mixture (a 100-wide layer over 100k
# rows) runs its epoch 1.8x faster in 4000-row blocks; a 10-wide net is fastest in 40k-row blocks (4096 rows: 0.7x)
BLOCK_ELEMENTS = 400_000
# decoder_table=auto: a 1-d latent whose decoder has at most this many outputs (normal means: 1); a table gathers 7 of
# them in float64 per chain and move, so for an image decoder (784) it costs about what the network does
TABLE_MAX_OUTPUTS = 64
__all__ = ["ALMOND", "first_occurrences", "inverse_sqrt_lr", "langevin_step_size"]


def langevin_step_size(step_size: float, epoch: int, decay: bool = True) -> float:
    """The paper's step size in Langevin-phase epoch `epoch` (0-based): s_e = max(s/10, s/sqrt(e+1)).

    Decaying s shrinks ULA's O(s) bias as the parameters settle; the floor s/10 keeps the chains mixing.
    """
    return max(step_size / 10.0, step_size / math.sqrt(epoch + 1.0)) if decay else step_size


class ALMOND(ChainsPosterior, LatentVariableModel):
    """ALMOND: Langevin E-step on persistent per-example chains, gradient M-step (see the module doc).

    `n_chains` chains per example; `sampler` the E-step kernel (a `LangevinSampler`, or ula|mala|annealed for
    the packaged conf/sampler/ presets), whose `n_steps` is the paper's "burnin" and whose `step_size` the
    schedule starts from (`step_size_decay`); `vae_epochs` (0: no encoder), `chain_init` auto|prior|encoder,
    `vae_optimizer` for the warm-up; `optimizer`/`scheduler` and `mstep_warmup_*` for the M-step.
    `sampler_seed` keys all of the method's noise (None: drawn once); `num_train` (N) is needed only outside a
    Trainer with a sized training set. `eval_chains`/`eval_langevin_steps`: fresh chains for other examples.
    `block_rows`: chains run and back-propagate in blocks of about this many rows (samplers/blocks.py; None: all;
    "auto": BLOCK_ELEMENTS over the decoder's widest layer, so each block's widest activation stays in cache);
    `block_workers`: blocks run side by side on this many threads ("auto": torch's thread count on CPU, else 1).
    `decoder_table`: with a 1-d latent, Langevin moves read the decoder from a verified cubic Hermite table built
    once per E-step (decoder_table.py: as accurate as the float32 network, 30-60x cheaper a move); "auto": on CPU
    for a decoder of at most TABLE_MAX_OUTPUTS outputs.
    """

    method = "almond"
    named_parts = ()
    float16_training = False  # the E-step's gradients in z never pass through Lightning's float16 loss scaler

    def __init__(self, data_dim: int, latent_dim: int = 8, image_shape: Sequence[int] | None = None,
                 net: NetSpec | Mapping[str, Any] | None = None, likelihood: LikelihoodSpec | Mapping[str, Any] | str | None = None,
                 optimizer: OptimizerFactory | None = None, scheduler: SchedulerFactory | None = None,
                 n_chains: int = 10, sampler: LangevinSampler | str | None = "ula", step_size_decay: bool = True,
                 chain_init: str = "auto", vae_epochs: int = 0, vae_optimizer: OptimizerFactory | None = None,
                 vae_num_samples: int = 1, mstep_warmup_epochs: int = 0, mstep_warmup_optimizer: OptimizerFactory | None = None,
                 eval_chains: int = 16, eval_langevin_steps: int = 50, sampler_seed: int | None = 0,
                 num_train: int | None = None, min_log_var: float = -12.0, block_rows: int | str | None = "auto",
                 block_workers: int | str = "auto", decoder_table: bool | str = "auto") -> None:
        super().__init__(data_dim, latent_dim, image_shape, net, likelihood, optimizer, scheduler)
        self.sampler = sampler_preset(sampler or "ula") if isinstance(sampler, str) or sampler is None else sampler
        if not isinstance(self.sampler, LangevinSampler):
            raise ConfigError(f"model=almond needs a Langevin sampler over z (sampler=ula|mala|annealed), got "
                              f"{type(self.sampler).__name__}")
        for key, value, low in (("n_chains", n_chains, 1), ("vae_epochs", vae_epochs, 0), ("vae_num_samples", vae_num_samples, 1),
                                ("mstep_warmup_epochs", mstep_warmup_epochs, 0), ("eval_chains", eval_chains, 2),
                                ("eval_langevin_steps", eval_langevin_steps, 0)):
            if int(value) < low:
                raise ConfigError(f"model.{key} must be an integer >= {low}, got {value}")
        if chain_init not in CHAIN_INITS:
            raise ConfigError(f"model.chain_init must be one of {'|'.join(CHAIN_INITS)}, got {chain_init!r}")
        if chain_init == "encoder" and int(vae_epochs) == 0:
            raise ConfigError("model.chain_init=encoder needs an encoder: set model.vae_epochs > 0 (the VAE "
                              "warm-up trains it) or use chain_init=prior")
        if num_train is not None and int(num_train) < 1:
            raise ConfigError(f"model.num_train must be >= 1 or null, got {num_train}")
        if block_rows not in (None, "auto") and (isinstance(block_rows, str) or int(block_rows) < 1):
            raise ConfigError(f"model.block_rows must be an integer >= 1, auto or null, got {block_rows!r}")
        if not (decoder_table == "auto" or isinstance(decoder_table, bool)):  # not `in (...)`: 1 == True
            raise ConfigError(f"model.decoder_table must be auto, true or false, got {decoder_table!r}")
        if decoder_table is True and int(latent_dim) != 1:
            raise ConfigError(f"model.decoder_table=true needs a 1-d latent (model.latent_dim=1), got latent_dim="
                              f"{latent_dim}; use decoder_table=auto or false")
        try:
            resolve_workers(block_workers, torch.device("cpu"))
        except ValueError as err:
            raise ConfigError(f"model.{err}") from None
        self.n_chains, self.step_size_decay = int(n_chains), bool(step_size_decay)
        self.vae_epochs, self.vae_num_samples = int(vae_epochs), int(vae_num_samples)
        self.mstep_warmup_epochs = int(mstep_warmup_epochs)
        self.chain_init = ("encoder" if self.vae_epochs > 0 else "prior") if chain_init == "auto" else chain_init
        self.eval_chains, self.eval_langevin_steps = int(eval_chains), int(eval_langevin_steps)
        self.seed = int(sampler_seed) if sampler_seed is not None else int(torch.randint(0, 2**31 - 1, ()))
        self.num_train = num_train
        self.vae_optimizer_factory = vae_optimizer or self.optimizer_factory
        self.mstep_warmup_factory = mstep_warmup_optimizer or self.optimizer_factory
        for factory in (self.vae_optimizer_factory, self.mstep_warmup_factory):
            check_optimizer_factory(factory)
        # The warm-up encoder q(z|x) exists only when there is a warm-up (it also seeds the chains).
        self.encoder = (GaussianEncoder.build(self.net_spec, self.data_dim, self.latent_dim, self.image_shape, min_log_var)
                        if self.vae_epochs > 0 else None)
        self.named_parts = ("encoder",) if self.encoder is not None else ()
        widest = max([m.out_features for m in self.model.decoder.modules() if isinstance(m, torch.nn.Linear)] or [data_dim])
        self.block_rows = (None if block_rows is None else max(1, BLOCK_ELEMENTS // widest) if block_rows == "auto"
                           else int(block_rows))
        self.block_workers = block_workers
        self.decoder_table = decoder_table
        self._table_warned_epoch = -1  # decoder_table=true warns once per epoch in which no table verifies
        self.store: PersistentChains | None = None  # allocated at train start (or from a checkpoint)
        self.automatic_optimization = False  # up to three optimisers (warm-up, M-step warm-up, M-step), one per phase
        # `num_train` stays out of hparams: loggers merge them with the data module's, which has its own.
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "vae_optimizer", "mstep_warmup_optimizer", "net",
                                          "likelihood", "num_train", "sampler"])
        self.hparams.update(net=self.net_spec.to_dict(), likelihood=vars(self.likelihood_spec).copy(),
                            sampler=repr(self.sampler), sampler_seed=self.seed)

    # ----- phases and schedules -----------------------------------------------------------------
    @property
    def in_vae_phase(self) -> bool:
        return self.current_epoch < self.vae_epochs

    @property
    def langevin_epoch(self) -> int:
        """0-based epoch index within the Langevin phase (the paper's e in s_e)."""
        return max(0, self.current_epoch - self.vae_epochs)

    @property
    def langevin_steps(self) -> int:
        return self.sampler.n_steps

    @property
    def sampler_kind(self) -> str:
        return type(self.sampler).__name__.lower()

    def current_step_size(self) -> float:
        return langevin_step_size(float(self.sampler.step_size), self.langevin_epoch, self.step_size_decay)

    def _generator(self, device: torch.device, stream: Stream, *keys: int) -> torch.Generator:
        rank = self.global_rank if self._trainer is not None else 0
        return keyed_generator(self.seed, stream, rank, *keys, device=device)

    # ----- persistent chains (for callbacks: states, visited mask, MALA's step sizes) ---------------
    @property
    def chains(self) -> Tensor | None:
        return None if self.store is None else self.store.z

    @property
    def visited(self) -> Tensor | None:
        return None if self.store is None else self.store.visited

    @property
    def chain_step_sizes(self) -> Tensor | None:
        return None if self.store is None else self.store.step

    def chain_states(self, index: Tensor) -> Tensor:
        """Current chain states (n_chains, batch, latent_dim) of training examples `index`."""
        if self.store is None:
            raise RuntimeError("ALMOND has no chains yet: train it (or load a checkpoint) first")
        return self.store.z[:, index.to(self.store.z.device)]

    def allocate_chains(self, num_train: int, device: torch.device | str = "cpu") -> None:
        """Empty chain storage for N training examples; each chain is initialised when first visited."""
        step = float(self.sampler.step_size) if self.sampler.adaptive else None
        self.store = PersistentChains(self.n_chains, num_train, self.latent_dim, step, device)

    def _train_size(self) -> int:
        """N of the training split: the constructor's `num_train`, the data module's, or the loader's."""
        if self.num_train is not None:
            return int(self.num_train)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "num_train", None) is not None:
            return int(datamodule.num_train)
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if dataset is None:
            raise ConfigError("ALMOND needs the size of the training split for its chains: use a latentlab data "
                              "module (num_train), a DataLoader over a sized dataset, or pass model.num_train")
        return len(dataset)

    def on_train_start(self) -> None:
        n = self._train_size()
        if self.store is None:
            self.allocate_chains(n, self.device)
        elif self.store.num_examples != n:
            raise CheckpointError(f"the checkpoint holds ALMOND chains for {self.store.num_examples} training examples "
                                  f"but this training split has {n}; resume with the same data settings")
        self.store.to(self.device)

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == self.vae_epochs:
            table = " through a verified table of the 1-d decoder" if self._table_wanted(self.device) else ""
            log.info("ALMOND: epoch %d starts the Langevin phase (%d chains x %s%s, step size %.4g)", self.current_epoch,
                     self.n_chains, self.sampler, table, self.current_step_size())
        elif self.current_epoch == 0 and self.vae_epochs > 0:
            log.info("ALMOND: VAE warm-up for %d epochs", self.vae_epochs)

    def initial_states(self, x: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
        """n starting points per example (n, batch, d): warm-up encoder draws q(z|x), or prior draws."""
        if self.chain_init == "encoder" and self.encoder is not None:
            with torch.no_grad():
                return reparameterized(*self.encoder(x), n, generator)
        return torch.randn((n, x.shape[0], self.latent_dim), generator=generator, device=x.device, dtype=x.dtype)

    # ----- E-step and M-step --------------------------------------------------------------------
    def e_step(self, x: Tensor, index: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Move the chains of examples `index` by the sampler under the current parameters, write them back
        (to every process under DDP), and return them (n_chains, batch, d) with the sampler's diagnostics."""
        if self.store is None:
            if self.num_train is None:
                raise ConfigError("ALMOND.e_step outside a Trainer needs chain storage: pass num_train=N to the "
                                  "constructor or call allocate_chains(N) first")
            self.allocate_chains(self.num_train, x.device)
        assert self.store is not None
        self.store.to(x.device)
        z0, fresh, step, count = self.store.read(index)
        z0 = torch.where(fresh[None, :, None], self.initial_states(x, self.n_chains, generator), z0)
        log_prob, rows, table = self._target(x, z0)
        result = sample_in_blocks(self.sampler.sample, log_prob, z0, rows, generator,
                                  step_size=self.current_step_size() if step is None else step, step_count=count,
                                  workers=self._workers(x))
        if not bool(torch.isfinite(result.z).all()):  # the one host sync of the E-step
            bad = int((~torch.isfinite(result.z).all(-1)).sum())
            raise NumericalError(
                f"ALMOND sampler produced non-finite chain states at training step {self.global_step} (epoch "
                f"{self.current_epoch}): {bad} of {result.z.shape[0] * result.z.shape[1]} chains; lower "
                f"sampler.step_size (now {self.current_step_size():.4g}) or set sampler.guard=true")
        gather = self.all_gather if self._distributed else None
        self.store.write(index, result.z, result.step_size if step is not None else None,
                         result.step_count if step is not None else None, gather)
        stats = {"step_size": result.step_size.mean(), "grad_norm": torch.as_tensor(result.diagnostics["grad_norm"])}
        for key in ("accept_rate", "n_nonfinite"):
            if key in result.diagnostics and (key != "n_nonfinite" or self.sampler.guard):
                stats[key] = torch.as_tensor(result.diagnostics[key])
        if table is not None:  # what the moves read: grid points, and chain moves outside the table
            stats.update(table_points=torch.tensor(float(table.points)), table_fallbacks=torch.tensor(float(table.fallbacks)))
        return result.z, stats

    def _table_wanted(self, device: torch.device) -> bool:
        """A 1-d latent with decoder_table=true, or auto on CPU (on an accelerator a table's range check would read
        back to the host every move) for a decoder of at most TABLE_MAX_OUTPUTS outputs."""
        auto = device.type == "cpu" and self.data_dim * self.model.likelihood.param_multiplier <= TABLE_MAX_OUTPUTS
        return self.latent_dim == 1 and (self.decoder_table is True or (self.decoder_table == "auto" and auto))

    def _target(self, x: Tensor, z0: Tensor) -> tuple[Callable[[Tensor], Tensor], int | None, DecoderTable | None]:
        """(log p(x, z) for the sampler, block_rows, the table): through a decoder table around the chains z0 when
        `decoder_table` allows and one verifies (then unblocked: no activations to keep in cache), else the
        network in blocks."""
        if self._table_wanted(z0.device):
            with torch.no_grad():
                table = DecoderTable.around(self.model.decoder, z0)
            if table is not None:
                return table.log_joint(self.model, x), None, table
            if self.decoder_table is True and self._table_warned_epoch != self.current_epoch:
                self._table_warned_epoch = self.current_epoch
                log.warning("ALMOND: no decoder table verified within its size limit at epoch %d; moving the "
                            "chains through the network (said once an epoch)", self.current_epoch)
        return self.model.joint(x), self.block_rows, None

    def m_step_loss(self, x: Tensor, z: Tensor) -> Tensor:
        """-E[log f(x | h(z))] over the chains, averaged over the batch (the paper's loss scaling)."""
        return -self.model.log_likelihood(x, z).mean()

    @property
    def _distributed(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1

    def _workers(self, x: Tensor) -> int:
        return resolve_workers(self.block_workers, x.device)

    def _backward_in_blocks(self, loss_of: Any, z: Tensor, extra: Tensor | None) -> Tensor:
        """`backward_in_blocks` with Lightning's backward; one block under DDP, which reduces gradients on every
        backward."""
        return backward_in_blocks(loss_of, z, None if self._distributed else self.block_rows, self.manual_backward,
                                  extra, params=self.parameters(), workers=self._workers(z))

    def _phase_optimizer(self) -> torch.optim.Optimizer:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        if self.in_vae_phase:
            return optimizers[self._slots["vae"]]  # type: ignore[return-value]
        warm = self.langevin_epoch < self.mstep_warmup_epochs
        return optimizers[self._slots["mstep_warmup" if warm else "mstep"]]  # type: ignore[return-value]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, index = batch
        generator = self._generator(x.device, Stream.LANGEVIN_TRAIN, self.current_epoch, batch_idx)
        logs: dict[str, Tensor] = {}
        optimizer = self._phase_optimizer()
        optimizer.zero_grad()
        if self.in_vae_phase:  # the ELBO over vae_num_samples draws: recon by blocks of draws, then the KL
            assert self.encoder is not None
            z, kl = self.encoder.rsample(x, self.vae_num_samples, generator)
            n = z.shape[0] * x.shape[0]
            nll = self._backward_in_blocks(lambda zb: -self.model.log_likelihood(x, zb).sum() / n, z, kl.mean())
            loss = nll + kl.mean().detach()
            logs.update(elbo=-loss, recon=-nll, kl=kl.mean().detach())
        else:
            z, logs = self.e_step(x, index, generator)
            zero = None
            if self.encoder is not None and self._distributed:
                # DDP expects a gradient for every parameter; the encoder rests in this phase (and is in no
                # Langevin-phase optimiser), so give it an exact zero instead of an error.
                zero = 0.0 * sum(p.sum() for p in self.encoder.parameters())
            share = 1.0 / z.shape[0]  # m_step_loss of a block of chains, weighted by its share of them
            loss = self._backward_in_blocks(lambda zb: self.m_step_loss(x, zb) * (zb.shape[0] * share), z, zero)
            logs["log_lik"] = -loss
        optimizer.step()
        self.log("train/phase", 0.0 if self.in_vae_phase else 1.0, prog_bar=True, batch_size=x.shape[0])  # a float: no sync
        if self.logging_step():
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=x.shape[0])
            for name, value in logs.items():
                self.log(f"train/{name}", value, batch_size=x.shape[0])
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        """Step the M-step schedule once per Langevin-phase epoch (manual optimisation steps nothing itself).

        It counts Langevin epochs, also those the M-step warm-up optimiser runs while the scheduled one rests,
        so PyTorch's "`lr_scheduler.step()` before `optimizer.step()`" warning is expected there and silenced."""
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.current_epoch >= self.vae_epochs:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                scheduler.step()  # type: ignore[union-attr]

    def configure_optimizers(self) -> Any:
        """M-step optimiser over the generative model, then (if used) its warm-up one and the VAE warm-up's."""
        mstep = build_optimizer(self.optimizer_factory, self.model.parameters())
        optimizers, self._slots = [mstep], {"mstep": 0}
        if self.mstep_warmup_epochs > 0:
            self._slots["mstep_warmup"] = len(optimizers)
            optimizers.append(build_optimizer(self.mstep_warmup_factory, self.model.parameters()))
        if self.encoder is not None:
            self._slots["vae"] = len(optimizers)
            optimizers.append(build_optimizer(self.vae_optimizer_factory, self.parameters()))
        if self.scheduler_factory is None:
            return optimizers
        return optimizers, [{"scheduler": self.scheduler_factory(mstep), "interval": "epoch"}]

    def evaluate_batch(self, x: Tensor, index: Tensor) -> dict[str, Tensor]:
        """The warm-up encoder's ELBO when there is one (how far the VAE posterior is from the model's)."""
        if self.encoder is None:
            return {}
        with torch.no_grad():
            generator = self._generator(x.device, Stream.WARMUP_ELBO, self.current_epoch, int(index[0]))
            recon, kl = elbo_terms(self.encoder, partial(self.model.log_likelihood, x), x, 1, generator)
        return {"elbo": (recon - kl).mean(), "recon": recon.mean(), "kl": kl.mean()}

    # ----- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Persist the chains (identical on every process) next to the weights, loadable with weights_only."""
        super().on_save_checkpoint(checkpoint)
        if self.store is not None:
            checkpoint["almond"] = {**self.store.state_dict(), "seed": self.seed}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore chains so that a resumed run (or `latentlab-eval`'s training-split posterior) continues them."""
        state = checkpoint.get("almond")
        if not state:
            return
        if self.store is None:
            self.allocate_chains(state["chains"].shape[1])
        assert self.store is not None
        self.store.load_state_dict(state)
        self.seed = int(state["seed"])
