"""ALMOND (Qiu & Wang 2020): stochastic EM with a Langevin E-step and no encoder.

The model is latentlab's one `GenerativeModel`: x | z ~ f_theta(x | h_eta(z)), z ~ pi_0 = N(0, I).
Each training step is one iteration of the paper's algorithm on a mini-batch:

- E-step: move `n_chains` persistent chains per example, z ~ p_beta_t(z | x) ∝ f(x | h(z)) pi_0(z)
  under the *current* parameters beta_t, with `langevin_steps` moves of
  z <- z + s grad_z log p(x, z) + sqrt(2 s) xi (`latentlab.samplers.ULA`, or MALA);
- M-step: one optimiser step on the Monte Carlo estimate of E[log f_beta(x | h(z))] over the chains.

Persistent chains: a (n_chains, N, latent_dim) tensor indexed by the data modules' example
`index`, kept across epochs, saved in checkpoints (so a resumed run continues the same chains) and,
under DDP, kept identical on every process by all-gathering (index, z) after each E-step.
Memory: N x n_chains x latent_dim float32 per process (MNIST, 60k x 20 x 20: 96 MB), plus
N x n_chains floats of per-chain step sizes with MALA.

Warm start as in the paper: `vae_epochs` epochs of a VAE (encoder + decoder, reparameterised ELBO),
then the Langevin "bias-correction" phase, whose chains start at draws from that encoder. The
Langevin step size decays per Langevin-phase epoch e as s_e = max(s / 10, s / sqrt(e + 1)), and the
M-step optimiser/schedule are configurable (`inverse_sqrt_lr` is the paper's 1/sqrt(epoch) rate).

All randomness (Langevin noise, chain initialisation, the VAE's reparameterisation noise) comes from
generators keyed on (seed, epoch, batch, process rank), so a run and its resumed continuation draw the
same noise, and processes never share a stream.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution
from torch.optim.lr_scheduler import LambdaLR

from latentlab.errors import CheckpointError, ConfigError, NumericalError
from latentlab.metrics.loglik import fit_gaussian_proposal
from latentlab.models.base import (
    EvalSpec,
    LatentVariableModel,
    LikelihoodSpec,
    OptimizerFactory,
    SchedulerFactory,
    check_optimizer_factory,
)
from latentlab.models.vae import gaussian_kl_to_standard_normal
from latentlab.nets import NetSpec, build_encoder
from latentlab.samplers import MALA, ULA, LangevinSampler, SamplerResult

log = logging.getLogger("latentlab")

SAMPLERS = ("ula", "mala")
CHAIN_INITS = ("auto", "prior", "encoder")
EVAL_PROPOSALS = ("langevin", "none")
# Purposes of the keyed random streams (the second key), so that streams never coincide.
_TRAIN_STREAM, _EVAL_STREAM, _ELBO_STREAM = 1, 2, 3
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "predict": 3}


def langevin_step_size(step_size: float, epoch: int, decay: bool = True) -> float:
    """The paper's step size in Langevin-phase epoch `epoch` (0-based): s_e = max(s/10, s/sqrt(e+1)).

    Decaying s shrinks ULA's O(s) bias as the parameters settle; the floor s/10 keeps the chains mixing.
    """
    if not decay:
        return step_size
    return max(step_size / 10.0, step_size / math.sqrt(epoch + 1.0))


def inverse_sqrt_lr(optimizer: torch.optim.Optimizer, warmup_epochs: int = 0) -> LambdaLR:
    """lr_e = lr_0 for the first `warmup_epochs` epochs, then lr_0 / sqrt(e - warmup_epochs + 1):
    the Robbins-Monro-type rate of the paper's M-step (its `fit_bc`). Stepped once per Langevin epoch."""
    if warmup_epochs < 0:
        raise ConfigError(f"inverse_sqrt_lr warmup_epochs must be >= 0, got {warmup_epochs}")
    return LambdaLR(optimizer, lambda e: 1.0 if e < warmup_epochs else 1.0 / math.sqrt(e - warmup_epochs + 1.0))


def keyed_generator(device: torch.device, *keys: int) -> torch.Generator:
    """A generator on `device` seeded by a hash of the non-negative integer `keys`.

    numpy's SeedSequence mixes structured keys into independent streams; re-seeding per step costs
    microseconds and makes every draw a function of (seed, epoch, batch, rank) alone.
    """
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & (2**63 - 1))


def first_occurrences(index: Tensor) -> Tensor:
    """Positions of the first occurrence of each distinct value of `index`, in value order.

    DistributedSampler pads with repeated examples; writing each index once keeps the chain update
    deterministic (a scatter with duplicate indices is not, on GPUs).
    """
    if index.numel() == 0:
        return index
    _, inverse = torch.unique(index, return_inverse=True)
    positions = torch.arange(index.numel(), device=index.device)
    first = torch.full((int(inverse.max()) + 1,), index.numel(), dtype=torch.long, device=index.device)
    return first.scatter_reduce_(0, inverse, positions, reduce="amin")


class ALMOND(LatentVariableModel):
    """ALMOND: Langevin E-step on persistent per-example chains, gradient M-step (see module doc).

    Main arguments: `n_chains` chains per example, `langevin_steps` sampler moves per E-step (the
    paper's "burnin"), `step_size` s, `step_size_decay` (s_e schedule), `sampler` ula|mala,
    `sampler_guard` (revert non-finite chain moves instead of failing), `vae_epochs` (VAE warm-up
    length; 0: no encoder), `chain_init` auto|prior|encoder, `optimizer`/`scheduler` for the
    Langevin-phase M-step, `vae_optimizer` for the warm-up.

    `sampler_seed` keys all of the method's noise (None: drawn once); `num_train` (N) is only needed
    without a latentlab data module or a sized training set.

    Evaluation: `proposal(x, index, split="train")` is a diagonal Gaussian fitted to the persistent
    chains of those training examples (std x `proposal_inflation`). Other examples (validation,
    test, anything passed without `split="train"`) have no chains, so with `eval_proposal=langevin`
    the proposal is fitted to `eval_chains` fresh chains run `eval_langevin_steps` Langevin steps
    from the encoder (after a warm-up) or the prior; with `eval_proposal=none` there is no proposal
    and `eval.estimator=auto` uses AIS. `eval.estimator=is` with `eval_proposal=none` is refused.
    """

    method = "almond"

    def __init__(
        self,
        data_dim: int,
        latent_dim: int = 8,
        image_shape: Sequence[int] | None = None,
        net: NetSpec | Mapping[str, Any] | None = None,
        likelihood: LikelihoodSpec | Mapping[str, Any] | str | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        eval: EvalSpec | Mapping[str, Any] | None = None,  # noqa: A002
        n_chains: int = 10,
        langevin_steps: int = 10,
        step_size: float = 0.1,
        step_size_decay: bool = True,
        sampler: str = "ula",
        target_accept: float = 0.574,
        sampler_guard: bool = False,
        chain_init: str = "auto",
        vae_epochs: int = 0,
        vae_optimizer: OptimizerFactory | None = None,
        vae_num_samples: int = 1,
        eval_proposal: str = "langevin",
        eval_chains: int = 16,
        eval_langevin_steps: int = 50,
        proposal_inflation: float = 1.2,
        sampler_seed: int | None = 0,
        num_train: int | None = None,
        min_log_var: float = -12.0,
    ) -> None:
        super().__init__(data_dim, latent_dim, image_shape, net, likelihood, optimizer, scheduler, eval)
        self._check_args(n_chains, langevin_steps, step_size, sampler, target_accept, chain_init, vae_epochs,
                         vae_num_samples, eval_proposal, eval_chains, eval_langevin_steps, proposal_inflation,
                         num_train)
        self.n_chains, self.langevin_steps = int(n_chains), int(langevin_steps)
        self.step_size, self.step_size_decay = float(step_size), bool(step_size_decay)
        self.sampler_kind, self.target_accept, self.sampler_guard = sampler, float(target_accept), bool(sampler_guard)
        self.vae_epochs, self.vae_num_samples = int(vae_epochs), int(vae_num_samples)
        self.chain_init = ("encoder" if self.vae_epochs > 0 else "prior") if chain_init == "auto" else chain_init
        self.eval_proposal, self.eval_chains = eval_proposal, int(eval_chains)
        self._validate_estimator()
        self.eval_langevin_steps, self.proposal_inflation = int(eval_langevin_steps), float(proposal_inflation)
        self.seed = int(sampler_seed) if sampler_seed is not None else int(torch.randint(0, 2**31 - 1, ()))
        self.num_train, self.min_log_var = num_train, min_log_var
        self.vae_optimizer_factory = vae_optimizer or self.optimizer_factory
        check_optimizer_factory(self.vae_optimizer_factory)
        # The warm-up encoder q(z|x) exists only when there is a warm-up (it also seeds the chains).
        self.encoder = (build_encoder(self.net_spec, self.data_dim, 2 * self.latent_dim, self.image_shape)
                        if self.vae_epochs > 0 else None)
        # Persistent chains: plain tensors, not buffers, so DDP does not broadcast them every step
        # and `latentlab-eval` loads state_dicts without them; checkpoints carry them (on_save_checkpoint).
        self._chains: Tensor | None = None      # (n_chains, N, latent_dim)
        self._visited: Tensor | None = None     # (N,) bool: chain initialised (visited at least once)
        self._chain_step: Tensor | None = None  # (n_chains, N) per-chain MALA step sizes
        self.automatic_optimization = False     # two optimisers (warm-up, M-step), one per phase
        # `num_train` stays out of hparams: loggers merge them with the data module's, which has its own.
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "vae_optimizer", "net", "likelihood", "eval",
                                          "num_train"])
        self.hparams.update(net=self.net_spec.to_dict(), likelihood=vars(self.likelihood_spec).copy(),
                            eval=vars(self.eval_spec).copy(), sampler_seed=self.seed)

    @staticmethod
    def _check_args(n_chains: int, langevin_steps: int, step_size: float, sampler: str, target_accept: float,
                    chain_init: str, vae_epochs: int, vae_num_samples: int, eval_proposal: str, eval_chains: int,
                    eval_langevin_steps: int, proposal_inflation: float, num_train: int | None) -> None:
        """Name every impossible value before training starts."""
        for key, value, low in (("n_chains", n_chains, 1), ("langevin_steps", langevin_steps, 1),
                                ("vae_epochs", vae_epochs, 0), ("vae_num_samples", vae_num_samples, 1),
                                ("eval_chains", eval_chains, 2), ("eval_langevin_steps", eval_langevin_steps, 0)):
            if int(value) < low:
                raise ConfigError(f"model.{key} must be an integer >= {low}, got {value}")
        if not step_size > 0:
            raise ConfigError(f"model.step_size must be > 0, got {step_size}")
        if not 0.0 < target_accept < 1.0:
            raise ConfigError(f"model.target_accept must be in (0, 1), got {target_accept}")
        if proposal_inflation < 1.0:
            raise ConfigError(f"model.proposal_inflation must be >= 1 (a proposal narrower than the chains "
                              f"makes importance weights heavy-tailed), got {proposal_inflation}")
        for key, value, allowed in (("sampler", sampler, SAMPLERS), ("chain_init", chain_init, CHAIN_INITS),
                                    ("eval_proposal", eval_proposal, EVAL_PROPOSALS)):
            if value not in allowed:
                raise ConfigError(f"model.{key} must be one of {'|'.join(allowed)}, got {value!r}")
        if chain_init == "encoder" and int(vae_epochs) == 0:
            raise ConfigError("model.chain_init=encoder needs an encoder: set model.vae_epochs > 0 (the VAE "
                              "warm-up trains it) or use chain_init=prior")
        if num_train is not None and int(num_train) < 1:
            raise ConfigError(f"model.num_train must be >= 1 or null, got {num_train}")

    def _validate_estimator(self) -> None:
        if self.eval_spec.estimator == "is" and self.eval_proposal == "none":
            raise ConfigError("model.eval.estimator=is needs a proposal for validation/test examples, which have "
                              "no persistent chains: set model.eval_proposal=langevin or model.eval.estimator=ais")

    # ----- phases and schedules -----------------------------------------------------------------
    @property
    def in_vae_phase(self) -> bool:
        return self.current_epoch < self.vae_epochs

    @property
    def langevin_epoch(self) -> int:
        """0-based epoch index within the Langevin phase (the paper's e in s_e)."""
        return max(0, self.current_epoch - self.vae_epochs)

    def current_step_size(self) -> float:
        return langevin_step_size(self.step_size, self.langevin_epoch, self.step_size_decay)

    def build_sampler(self, n_steps: int) -> LangevinSampler:
        """The E-step kernel; its step size is passed per call (schedule, or persisted MALA steps)."""
        if self.sampler_kind == "mala":
            return MALA(self.step_size, n_steps, target_accept=self.target_accept, guard=self.sampler_guard)
        return ULA(self.step_size, n_steps, guard=self.sampler_guard)

    def _generator(self, device: torch.device, stream: int, *keys: int) -> torch.Generator:
        return keyed_generator(device, self.seed, stream, self.global_rank, *keys)

    # ----- persistent chains --------------------------------------------------------------------
    @property
    def chains(self) -> Tensor | None:
        """All persistent chain states (n_chains, N, latent_dim), or None before training."""
        return self._chains

    @property
    def visited(self) -> Tensor | None:
        """(N,) bool: which training examples' chains have been initialised and moved."""
        return self._visited

    @property
    def chain_step_sizes(self) -> Tensor | None:
        """(n_chains, N) per-chain step sizes MALA has adapted, or None (ULA, or before training)."""
        return self._chain_step

    def chain_states(self, index: Tensor) -> Tensor:
        """Current chain states (n_chains, batch, latent_dim) of training examples `index`."""
        if self._chains is None:
            raise RuntimeError("ALMOND has no chains yet: train it (or load a checkpoint) first")
        return self._chains[:, index.to(self._chains.device)]

    def allocate_chains(self, num_train: int, device: torch.device | str = "cpu") -> None:
        """Empty chain storage for N training examples; each chain is initialised when first visited."""
        shape = (self.n_chains, int(num_train))
        self._chains = torch.zeros(*shape, self.latent_dim, device=device)
        self._visited = torch.zeros(shape[1], dtype=torch.bool, device=device)
        self._chain_step = torch.full(shape, self.step_size, device=device) if self.sampler_kind == "mala" else None

    def _chains_to(self, device: torch.device) -> None:
        if self._chains is not None and self._chains.device != device:
            self._chains, self._visited = self._chains.to(device), self._visited.to(device)  # type: ignore[union-attr]
            if self._chain_step is not None:
                self._chain_step = self._chain_step.to(device)

    def _train_size(self) -> int:
        """N of the training split: the constructor's `num_train`, the data module's, or the loader's."""
        if self.num_train is not None:
            return int(self.num_train)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "num_train", None) is not None:
            return int(datamodule.num_train)
        loader = self.trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise ConfigError("ALMOND needs the size of the training split for its chains: use a latentlab data "
                              "module (num_train), a DataLoader over a sized dataset, or pass model.num_train")
        return len(dataset)

    def on_train_start(self) -> None:
        self._validate_estimator()
        n = self._train_size()
        if self._chains is None:
            self.allocate_chains(n, self.device)
        elif self._chains.shape[1] != n:
            raise CheckpointError(f"the checkpoint holds ALMOND chains for {self._chains.shape[1]} training examples "
                                  f"but this training split has {n}; resume with the same data settings")
        self._chains_to(self.device)

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == self.vae_epochs:
            log.info("ALMOND: epoch %d starts the Langevin phase (step size %.4g, %d chains x %d steps)",
                     self.current_epoch, self.current_step_size(), self.n_chains, self.langevin_steps)
        elif self.current_epoch == 0 and self.vae_epochs > 0:
            log.info("ALMOND: VAE warm-up for %d epochs", self.vae_epochs)

    def _initial_states(self, x: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
        """n starting points per example (n, batch, d): encoder draws q(z|x) or prior draws."""
        shape = (n, x.shape[0], self.latent_dim)
        eps = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
        if self.chain_init == "encoder" and self.encoder is not None:
            with torch.no_grad():
                mu, log_var = self.encode(x)
            return mu + torch.exp(0.5 * log_var) * eps
        return eps

    def e_step(self, x: Tensor, index: Tensor,
               generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """Move the chains of examples `index` by `langevin_steps` sampler moves under the current
        parameters, write them back (to every process under DDP), and return them (n_chains, batch, d)."""
        if self._chains is None:
            if self.num_train is None:
                raise ConfigError("ALMOND.e_step outside a Trainer needs chain storage: pass num_train=N to the "
                                  "constructor or call allocate_chains(N) first")
            self.allocate_chains(self.num_train, x.device)
        self._chains_to(x.device)
        assert self._chains is not None and self._visited is not None
        z0 = self._chains[:, index]
        fresh = ~self._visited[index]
        if bool(fresh.any()):
            z0 = torch.where(fresh[None, :, None], self._initial_states(x, self.n_chains, generator), z0)
        if self._chain_step is not None:
            step: float | Tensor = torch.where(fresh[None, :], self.step_size, self._chain_step[:, index])
        else:
            step = self.current_step_size()
        result: SamplerResult = self.build_sampler(self.langevin_steps).sample(
            lambda z: self.model.log_joint(x, z), z0, generator=generator, step_size=step)
        z = result.z
        if not bool(torch.isfinite(z).all()):
            bad = int((~torch.isfinite(z).all(-1)).sum())
            raise NumericalError(
                f"ALMOND sampler produced non-finite chain states at training step {self.global_step} "
                f"(epoch {self.current_epoch}): {bad} of {z.shape[0] * z.shape[1]} chains; lower model.step_size "
                f"(now {self.current_step_size():.4g})"
                f"{'' if self.sampler_guard else ' or set model.sampler_guard=true'}")
        self._write_chains(index, z, result.step_size if self._chain_step is not None else None)
        stats = {"step_size": float(result.step_size.mean()), "grad_norm": float(result.diagnostics["grad_norm"])}
        if "accept_rate" in result.diagnostics:
            stats["accept_rate"] = float(result.diagnostics["accept_rate"])
        if self.sampler_guard:
            stats["n_nonfinite"] = float(result.diagnostics["n_nonfinite"])
        return z, stats

    def _world_size(self) -> int:
        return int(self.trainer.world_size) if self._trainer is not None else 1

    def _write_chains(self, index: Tensor, z: Tensor, step: Tensor | None) -> None:
        """Store new states; under DDP all-gather every process's (index, z) first so all replicas agree."""
        assert self._chains is not None and self._visited is not None
        if self._world_size() > 1:
            index, z, step = self._gather_updates(index, z, step)
        keep = first_occurrences(index)
        index, z = index[keep], z[:, keep]
        self._chains[:, index] = z.detach()
        self._visited[index] = True
        if step is not None and self._chain_step is not None:
            self._chain_step[:, index] = step[:, keep]

    def _gather_updates(self, index: Tensor, z: Tensor, step: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(index, z, step) from all processes, batch sizes padded to the largest (index -1 = padding)."""
        batch = index.shape[0]
        largest = int(self.all_gather(torch.tensor(batch, device=index.device)).max())
        pad = largest - batch
        index = torch.nn.functional.pad(index, (0, pad), value=-1)
        parts = [z] + ([step.unsqueeze(-1)] if step is not None else [])
        packed = torch.nn.functional.pad(torch.cat(parts, dim=-1), (0, 0, 0, pad))  # (C, largest, d [+1])
        all_index = self.all_gather(index).reshape(-1)                                # (W * largest,)
        all_packed = self.all_gather(packed)                                          # (W, C, largest, d [+1])
        all_packed = all_packed.movedim(0, 1).reshape(self.n_chains, -1, packed.shape[-1])
        valid = all_index >= 0
        all_index, all_packed = all_index[valid], all_packed[:, valid]
        if step is None:
            return all_index, all_packed, None
        return all_index, all_packed[..., :-1], all_packed[..., -1]

    # ----- the VAE warm-up ----------------------------------------------------------------------
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Warm-up encoder q(z|x) = N(mu, diag exp(log_var))."""
        if self.encoder is None:
            raise ConfigError("this ALMOND model has no encoder (model.vae_epochs=0)")
        mu, log_var = self.encoder(x).chunk(2, dim=-1)
        return mu, log_var.clamp(min=self.min_log_var)

    def elbo_terms(self, x: Tensor, num_samples: int = 1,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(E_q log p(x|z), KL(q || p)) per example with the warm-up encoder, as in the VAE."""
        mu, log_var = self.encode(x)
        eps = torch.randn((num_samples, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
        recon = self.model.log_likelihood(x, mu + torch.exp(0.5 * log_var) * eps).mean(0)
        return recon, gaussian_kl_to_standard_normal(mu, log_var)

    # ----- training -----------------------------------------------------------------------------
    def _phase_optimizer(self) -> torch.optim.Optimizer:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        return optimizers[1] if self.in_vae_phase else optimizers[0]  # type: ignore[return-value]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, index = batch
        generator = self._generator(x.device, _TRAIN_STREAM, self.current_epoch, batch_idx)
        logs: dict[str, float | Tensor] = {"phase": 0.0 if self.in_vae_phase else 1.0}
        if self.in_vae_phase:
            recon, kl = self.elbo_terms(x, self.vae_num_samples, generator)
            loss = -(recon - kl).mean()
            logs.update(elbo=-loss.detach(), recon=recon.mean().detach(), kl=kl.mean().detach())
        else:
            z, stats = self.e_step(x, index, generator)
            log_lik = self.model.log_likelihood(x, z).mean(0)  # Monte Carlo E[log f(x | h(z))] over the chains
            loss = -log_lik.mean()
            logs.update(log_lik=-loss.detach(), **stats)
            if self.encoder is not None and self._world_size() > 1:
                # DDP expects a gradient for every parameter; the encoder rests in this phase (and is
                # not in the M-step optimiser), so give it an exact zero instead of an error.
                loss = loss + 0.0 * sum(p.sum() for p in self.encoder.parameters())
        if not bool(torch.isfinite(loss)):
            phase = "VAE warm-up" if self.in_vae_phase else "M-step"
            raise NumericalError(f"ALMOND {phase} loss is not finite at training step {self.global_step} "
                                 f"(epoch {self.current_epoch}, batch {batch_idx}); lower the learning rate")
        optimizer = self._phase_optimizer()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=x.shape[0])
        for name, value in logs.items():
            self.log(f"train/{name}", value, prog_bar=name == "phase", batch_size=x.shape[0])
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        """Step the M-step schedule once per Langevin-phase epoch (manual optimisation steps nothing itself)."""
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.current_epoch >= self.vae_epochs:
            scheduler.step()  # type: ignore[union-attr]

    def configure_optimizers(self) -> Any:
        """[M-step optimiser over the generative model, warm-up optimiser over encoder + model]."""
        mstep = self.optimizer_factory(self.model.parameters())
        optimizers = [mstep] + ([self.vae_optimizer_factory(self.parameters())] if self.encoder is not None else [])
        if self.scheduler_factory is None:
            return optimizers
        return optimizers, [{"scheduler": self.scheduler_factory(mstep), "interval": "epoch"}]

    # ----- evaluation ---------------------------------------------------------------------------
    def _current_split(self) -> str:
        """The split an evaluation call works on, as far as the trainer knows (it keys the noise stream)."""
        trainer = self._trainer
        if trainer is None:
            return "val"
        if trainer.testing:
            return "test"
        if trainer.predicting:
            return "predict"
        return "val"

    def nll_estimator(self) -> str:
        """`auto`: importance sampling with the Langevin-fitted proposal, or AIS with `eval_proposal=none`."""
        self._validate_estimator()
        if self.eval_spec.estimator == "auto":
            return "is" if self.eval_proposal == "langevin" else "ais"
        return self.eval_spec.estimator

    def posterior_samples(self, x: Tensor, n_chains: int, n_steps: int,
                          generator: torch.Generator | None = None) -> Tensor:
        """(n_chains, batch, d) approximate draws from p(z | x) for examples without persistent chains:
        start at the encoder (if warmed up) or the prior, then `n_steps` Langevin moves."""
        z0 = self._initial_states(x, n_chains, generator)
        if n_steps == 0:
            return z0
        result = self.build_sampler(n_steps).sample(lambda z: self.model.log_joint(x, z), z0, generator=generator,
                                                    step_size=self.current_step_size())
        if not bool(torch.isfinite(result.z).all()):
            raise NumericalError("ALMOND evaluation sampler produced non-finite chain states; lower model.step_size")
        return result.z

    def posterior_draws(self, x: Tensor, index: Tensor | None, n: int,
                        generator: torch.Generator | None = None) -> Tensor:
        """Evaluator hook: n draws per example from n fresh Langevin chains (`posterior_samples` with
        `eval_langevin_steps` moves), ALMOND's only representation of p(z | x) for test examples."""
        return self.posterior_samples(x, n, self.eval_langevin_steps, generator)

    def elbo_estimate(self, x: Tensor, index: Tensor | None = None, k: int = 100,
                      generator: torch.Generator | None = None) -> Tensor:
        """Evaluator hook, the Langevin samples' fit: the ELBO of the diagonal Gaussian fitted to `eval_chains`
        Langevin draws, E_q[log p(x, z)] + H(q), a true lower bound (ALMOND has no q of its own)."""
        from latentlab.metrics.posterior import fitted_gaussian_elbo

        draws = self.posterior_draws(x, index, self.eval_chains, generator)
        return fitted_gaussian_elbo(self.model.log_joint, x, draws, k=k, generator=generator)

    def proposal(self, x: Tensor, index: Tensor | None = None, split: str | None = None) -> Distribution | None:
        """Diagonal Gaussian proposal for importance sampling, batch_shape (batch,).

        `split="train"` with `index`: fitted to those examples' persistent chains. Otherwise (the
        default, what validation/test use: their `index` counts positions in *their* split) fitted
        to fresh Langevin chains, or None with `eval_proposal=none`.
        """
        split = split or self._current_split()
        if (split == "train" and index is not None and self.n_chains >= 2 and self._visited is not None
                and bool(self._visited[index.to(self._visited.device)].all())):
            return fit_gaussian_proposal(self.chain_states(index).to(x.device), self.proposal_inflation)
        if self.eval_proposal == "none":
            return None
        first = int(index[0]) if index is not None and index.numel() else 0
        generator = self._generator(x.device, _EVAL_STREAM, _SPLIT_IDS.get(split, 3), self.current_epoch, first)
        samples = self.posterior_samples(x, self.eval_chains, self.eval_langevin_steps, generator)
        return fit_gaussian_proposal(samples, self.proposal_inflation)

    def evaluate_batch(self, x: Tensor, index: Tensor) -> dict[str, Tensor]:
        """The warm-up encoder's ELBO when there is one (how far the VAE posterior is from the model's)."""
        if self.encoder is None:
            return {}
        with torch.no_grad():
            generator = self._generator(x.device, _ELBO_STREAM, self.current_epoch, int(index[0]))
            recon, kl = self.elbo_terms(x, 1, generator)
        return {"elbo": (recon - kl).mean(), "recon": recon.mean(), "kl": kl.mean()}

    # ----- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Persist the chains (identical on every process) next to the weights, loadable with weights_only."""
        super().on_save_checkpoint(checkpoint)
        if self._chains is not None:
            assert self._visited is not None
            checkpoint["almond"] = {"chains": self._chains.detach().cpu(), "visited": self._visited.cpu(),
                                    "chain_step": None if self._chain_step is None else self._chain_step.cpu(),
                                    "seed": self.seed}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore chains so that a resumed run (or `latentlab-eval`'s training-split proposal) continues them."""
        state = checkpoint.get("almond")
        if not state:
            return
        chains = state["chains"]
        if chains.shape[0] != self.n_chains or chains.shape[2] != self.latent_dim:
            raise CheckpointError(f"checkpoint chains have shape {tuple(chains.shape)} but this model has "
                                  f"n_chains={self.n_chains}, latent_dim={self.latent_dim}")
        self._chains, self._visited, self.seed = chains, state["visited"], int(state["seed"])
        if self.sampler_kind == "mala":
            step = state.get("chain_step")
            self._chain_step = step if step is not None else torch.full(chains.shape[:2], self.step_size)
        else:
            self._chain_step = None
