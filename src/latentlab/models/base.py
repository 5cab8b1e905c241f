"""The thin shared base of every method: builds p(x, z), evaluates log p(x), saves what eval needs.

A method subclass supplies `training_step`, `evaluate_batch` (its own bound/diagnostics) and, if it
has one, a `proposal(x, index)` for importance sampling. Everything else (optimisers from Hydra
partials, the log-likelihood estimator, sampling, reconstructions, checkpoint metadata) lives here
once, so a new method is one file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import lightning.pytorch as L
import torch
from torch import Tensor
from torch.distributions import Distribution

import latentlab
from latentlab.errors import ConfigError
from latentlab.generative import GenerativeModel
from latentlab.likelihoods import BernoulliLikelihood, GaussianLikelihood, Likelihood
from latentlab.nets import NetSpec, build_decoder

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]


def _plain(obj: Any) -> Any:
    """DictConfig/ListConfig/dataclass -> plain python containers (checkpoints stay weights_only-loadable)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return obj


@dataclass
class LikelihoodSpec:
    """p(x | z): `bernoulli` (logits) or `gaussian` with fixed `variance` or learned (`learn_variance`,
    shared per-dimension, or predicted per example with `per_sample`)."""

    kind: str = "bernoulli"
    variance: float = 1.0
    learn_variance: bool = False
    per_sample: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("bernoulli", "gaussian"):
            raise ConfigError(f"model.likelihood.kind must be 'bernoulli' or 'gaussian', got {self.kind!r}")
        if self.variance <= 0:
            raise ConfigError(f"model.likelihood.variance must be > 0, got {self.variance}")

    @classmethod
    def coerce(cls, spec: "LikelihoodSpec | Mapping[str, Any] | str | None") -> "LikelihoodSpec":
        if spec is None:
            return cls()
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, str):
            return cls(kind=spec)
        return cls(**dict(spec))

    def build(self, data_dim: int) -> Likelihood:
        if self.kind == "bernoulli":
            return BernoulliLikelihood()
        return GaussianLikelihood(data_dim, self.variance, self.learn_variance, self.per_sample)


@dataclass
class EvalSpec:
    """How log p(x) is estimated on validation/test.

    `estimator`: `auto` (importance sampling with the method's proposal when it has one, else AIS),
    `is`, or `ais`. `k`: importance samples per example (IWAE-style bound, tightens with k).
    AIS: `ais_steps` intermediate distributions, `ais_chains` chains, `ais_leapfrog` HMC leapfrog steps.
    `val_every_n_epochs`: the NLL is costly; 0 disables it on validation (test always runs it).
    `max_batches`: evaluate log p(x) on at most this many batches per val/test epoch (None: all).
    `ais_init`: AIS's starting distribution q0: `prior` N(0, I), or `posterior`, a Gaussian from the
    method's own posterior (its proposal, else fitted to `posterior_draws`) as in the AVB paper's
    evaluation; the closer q0 is to p(z|x), the fewer annealing steps AIS needs.
    """

    estimator: str = "auto"
    k: int = 100
    chunk_size: int = 100
    ais_steps: int = 100
    ais_chains: int = 4
    ais_leapfrog: int = 5
    val_every_n_epochs: int = 1
    max_batches: int | None = None
    ais_init: str = "prior"

    def __post_init__(self) -> None:
        if self.estimator not in ("auto", "is", "ais"):
            raise ConfigError(f"model.eval.estimator must be one of auto|is|ais, got {self.estimator!r}")
        if self.ais_init not in ("prior", "posterior"):
            raise ConfigError(f"model.eval.ais_init must be prior|posterior, got {self.ais_init!r}")
        for key in ("k", "chunk_size", "ais_steps", "ais_chains", "ais_leapfrog"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"model.eval.{key} must be >= 1, got {getattr(self, key)}")

    @classmethod
    def coerce(cls, spec: "EvalSpec | Mapping[str, Any] | None") -> "EvalSpec":
        if spec is None:
            return cls()
        return spec if isinstance(spec, cls) else cls(**dict(spec))


class LatentVariableModel(L.LightningModule):
    """Base LightningModule: owns `self.model` (a GenerativeModel) and the shared evaluation."""

    method: str = "base"

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        image_shape: Sequence[int] | None = None,
        net: NetSpec | Mapping[str, Any] | None = None,
        likelihood: LikelihoodSpec | Mapping[str, Any] | str | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        eval: EvalSpec | Mapping[str, Any] | None = None,  # noqa: A002 - the config key users type
    ) -> None:
        super().__init__()
        if int(latent_dim) <= 0:
            raise ConfigError(f"model.latent_dim must be a positive integer, got {latent_dim}")
        if int(data_dim) <= 0:
            raise ConfigError(f"data_dim must be a positive integer, got {data_dim}")
        self.data_dim, self.latent_dim = int(data_dim), int(latent_dim)
        self.image_shape = tuple(int(s) for s in image_shape) if image_shape is not None else None
        self.net_spec = NetSpec.coerce(_plain(net))
        self.likelihood_spec = LikelihoodSpec.coerce(_plain(likelihood))
        self.eval_spec = EvalSpec.coerce(_plain(eval))
        self.optimizer_factory = optimizer or torch.optim.Adam
        self.scheduler_factory = scheduler
        check_optimizer_factory(self.optimizer_factory)
        lik = self.likelihood_spec.build(self.data_dim)
        decoder = build_decoder(self.net_spec, self.latent_dim, self.data_dim * lik.param_multiplier, self.image_shape)
        self.model = GenerativeModel(decoder, lik, self.latent_dim)
        from latentlab.metrics.loglik import LogLikelihood

        self.val_loglik = LogLikelihood()
        self.test_loglik = LogLikelihood()
        self.run_config: dict[str, Any] | None = None  # the resolved Hydra config, saved in checkpoints

    # ----- things a method provides -------------------------------------------------------------
    def proposal(self, x: Tensor, index: Tensor | None = None) -> Distribution | None:
        """A distribution over z with batch shape (batch,) for importance sampling, or None."""
        return None

    def evaluate_batch(self, x: Tensor, index: Tensor) -> dict[str, Tensor]:
        """Per-batch means of the method's own diagnostics (e.g. `elbo`, `kl`, `recon`)."""
        return {}

    def posterior_draws(self, x: Tensor, index: Tensor | None, n: int,
                        generator: torch.Generator | None = None) -> Tensor | None:
        """n draws (n, batch, d) from the method's own posterior approximation, or None without one.

        The evaluator's window into a method's posterior (pictures, Gaussian fits, AIS starts). The
        default samples `proposal`; implicit or sampling-based methods override it.
        """
        from latentlab.metrics.loglik import sample_proposal

        with torch.no_grad():
            q = self.proposal(x, index)
        return None if q is None else sample_proposal(q, n, generator)

    def amortized_gaussian(self, x: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        """(mu, log_var) (batch, d) of an amortized diagonal-Gaussian posterior, or None.

        Methods that have one get the Cremer et al. split of the inference gap: the per-example
        Gaussian optimisation starts here, and its gain over this Gaussian is the amortization gap.
        """
        return None

    def elbo_estimate(self, x: Tensor, index: Tensor | None = None, k: int = 100,
                      generator: torch.Generator | None = None) -> Tensor | None:
        """The method's own per-example lower bound on log p(x), (batch,), from k samples; None without one.

        log p(x) minus this is the method's inference gap. Default: the ELBO of `amortized_gaussian`.
        """
        gaussian = self.amortized_gaussian(x, index)
        if gaussian is None:
            return None
        from latentlab.metrics.gaps import gaussian_elbo

        with torch.no_grad():
            return gaussian_elbo(self.model.log_joint, x, *gaussian, k=k, generator=generator)

    def ais_start(self, x: Tensor, index: Tensor | None = None, n: int = 256) -> Distribution | None:
        """q0 for AIS per `eval_spec.ais_init`: None (the prior), or from the method's posterior: its
        proposal if it has one, else a diagonal Gaussian fitted to n `posterior_draws`."""
        if self.eval_spec.ais_init == "prior":
            return None
        from latentlab.metrics.loglik import fit_gaussian_proposal

        with torch.no_grad():
            q = self.proposal(x, index)
            if q is not None:
                return q
            draws = self.posterior_draws(x, index, n)
        return None if draws is None else fit_gaussian_proposal(draws)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """E[x | z] for one posterior draw of z given x; methods without an encoder may return None."""
        q = self.proposal(x, index)
        if q is None:
            return None  # type: ignore[return-value]
        return self.model.likelihood.mean(self.model.decode(q.mean))

    def components(self) -> dict[str, torch.nn.Module]:
        """The method's named parts, so a numerical fault can be reported as "in the decoder" rather than
        as a parameter name: the decoder, a learned likelihood, and any `encoder`/`discriminator`.
        A method with other parts overrides this (keeping the names users know from the papers)."""
        parts: dict[str, torch.nn.Module] = {"decoder": self.model.decoder}
        if any(True for _ in self.model.likelihood.parameters()):
            parts["likelihood"] = self.model.likelihood
        for name in ("encoder", "discriminator"):
            module = getattr(self, name, None)
            if isinstance(module, torch.nn.Module):
                parts[name] = module
        return parts

    # ----- shared evaluation ------------------------------------------------------------------
    def nll_estimator(self) -> str:
        est = self.eval_spec.estimator
        if est == "auto":
            return "is" if type(self).proposal is not LatentVariableModel.proposal else "ais"
        return est

    def log_px(self, x: Tensor, index: Tensor | None = None, estimator: str | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Per-example estimate of log p(x) (nats) with the configured estimator (or `estimator`: is|ais)."""
        from latentlab.metrics.loglik import ais_log_likelihood, importance_sampling_log_likelihood

        spec = self.eval_spec
        if (estimator or self.nll_estimator()) == "is":
            with torch.no_grad():
                q = self.proposal(x, index)
            if q is None:
                raise ConfigError(f"model.eval.estimator=is needs a proposal, and {self.method} has none here; use ais")
            with torch.no_grad():
                return importance_sampling_log_likelihood(self.model.log_joint, q, x, k=spec.k, chunk_size=spec.chunk_size,
                                                          generator=generator)
        log_px, _ = ais_log_likelihood(self.model.log_joint, x, n_steps=spec.ais_steps, n_chains=spec.ais_chains,
                                       leapfrog_steps=spec.ais_leapfrog, init=self.ais_start(x, index),
                                       generator=generator, return_diagnostics=False)
        return log_px

    def _eval_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> None:
        x, index = batch
        stats = self.evaluate_batch(x, index)
        for name, value in stats.items():
            self.log(f"{stage}/{name}", value, on_step=False, on_epoch=True, batch_size=x.shape[0], sync_dist=True)
        metric = self.val_loglik if stage == "val" else self.test_loglik
        if self._nll_due(stage, batch_idx):
            metric.update(self.log_px(x, index).detach())

    def _nll_due(self, stage: str, batch_idx: int) -> bool:
        spec = self.eval_spec
        if spec.max_batches is not None and batch_idx >= spec.max_batches:
            return False
        if stage == "val":
            every = spec.val_every_n_epochs
            return every > 0 and (self.current_epoch + 1) % every == 0
        return True

    def _log_loglik(self, stage: str) -> None:
        metric = self.val_loglik if stage == "val" else self.test_loglik
        if int(metric.count) > 0:
            result = metric.compute()
            self.log(f"{stage}/nll", result["nll"], sync_dist=False)
            self.log(f"{stage}/nll_se", result["nll_se"], sync_dist=False)
        metric.reset()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_loglik("val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._log_loglik("test")

    # ----- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.model.sample(n, generator=generator)

    # ----- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"}}

    # ----- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record what `latentlab-eval` needs to rebuild this model without unpickling code."""
        checkpoint["latentlab"] = {
            "method": self.method,
            "version": latentlab.__version__,
            "config": self.run_config,
        }


def check_optimizer_factory(factory: Any) -> None:
    """Fail before training on an impossible learning rate (the optimiser itself only checks when built)."""
    keywords = getattr(factory, "keywords", None) or {}
    lr = keywords.get("lr")
    if lr is not None and not float(lr) > 0:
        raise ConfigError(f"model.optimizer.lr must be > 0, got {lr}")
