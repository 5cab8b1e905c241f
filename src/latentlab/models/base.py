"""The thin shared base of every method: builds p(x, z), evaluates log p(x), saves what eval needs.

A method subclass implements (the list is complete):

- `posterior(x, index) -> latentlab.posterior.Posterior`: its approximate posterior for a batch (`index`:
  the examples' dataset positions, for methods with per-example state). The only hook the evaluator uses.
- `training_step(batch, batch_idx)`; optionally `evaluate_batch(x, index)` (its own val/test diagnostics).
- `named_parts`: names of its nn.Module attributes besides the decoder (e.g. ("encoder",)), for messages
  and `callbacks.compile`.

It gets: `self.model` (the GenerativeModel), optimisers from Hydra partials, val/test log p(x) by the one
protocol of `latentlab.estimators.estimate_log_px` (settings `conf/eval/nll/`), sampling and checkpoint metadata.
"""

from __future__ import annotations

import contextlib
import logging
from abc import abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import lightning.pytorch as L
import torch
from torch import Tensor

import latentlab
from latentlab.errors import ConfigError
from latentlab.estimators import CONVERGENCE_FLAG_NATS, LogPxEstimate, NLLSettings, estimate_log_px
from latentlab.generative import GenerativeModel
from latentlab.likelihoods import BernoulliLikelihood, GaussianLikelihood, Likelihood
from latentlab.metrics.loglik import LogLikelihood
from latentlab.nets import NetSpec, build_decoder
from latentlab.optim import lightning_optimizers  # fused kernel by default: exact, ~4x faster step
from latentlab.posterior import Posterior
from latentlab.rng import Stream, key_seed, seeded_global_rng

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]
STAGE_IDS = {"val": 1, "test": 2}
latentlab_log = logging.getLogger("latentlab")


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


#: examples of a batch whose log p(x) Lightning's sanity check estimates: enough to run the estimator's code path
#: (AIS with a conv decoder on a CPU takes minutes for a whole batch, before the first training step)
SANITY_EXAMPLES = 2


def float32_evaluation(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for a validation/test step: Lightning runs them under the training precision's autocast, so with
    `trainer.precision=bf16-mixed` the decoder's logits, and so val/test ELBO and NLL, would be computed in bf16 (on
    MNIST's VAE the IS test NLL moved by 0.05 nats, per-image sd 0.09). Reported numbers must not depend on how a model
    was trained; parameters stay as they are (float32 under any `*-mixed` precision)."""
    return torch.autocast(x.device.type, enabled=False)


class LeanLightningModule(L.LightningModule):
    """A LightningModule whose hook-name bookkeeping is a plain attribute.

    Lightning assigns `_current_fx_name` before and after every hook, ~40 times a training step: through
    nn.Module's `__setattr__` (parameter, buffer and submodule checks) 1.5 us each, ~60 us a step (0.3% of the
    MNIST VAE's); as a plain attribute 0.14 us. A string is never a parameter, buffer or module: same result.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)


class LatentVariableModel(LeanLightningModule):
    """Base LightningModule: owns `self.model` (a GenerativeModel) and the shared evaluation (module docstring)."""

    method: str = "base"
    named_parts: ClassVar[tuple[str, ...]] = ()
    #: whether `trainer.precision=16-mixed` can train it: False where gradients bypass Lightning's loss scaler
    float16_training: ClassVar[bool] = True

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        image_shape: Sequence[int] | None = None,
        net: NetSpec | Mapping[str, Any] | None = None,
        likelihood: LikelihoodSpec | Mapping[str, Any] | str | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
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
        self.optimizer_factory = optimizer or torch.optim.Adam
        self.scheduler_factory = scheduler
        check_optimizer_factory(self.optimizer_factory)
        lik = self.likelihood_spec.build(self.data_dim)
        decoder = build_decoder(self.net_spec, self.latent_dim, self.data_dim * lik.param_multiplier, self.image_shape)
        self.model = GenerativeModel(decoder, lik, self.latent_dim)
        self.val_loglik = LogLikelihood()
        self.test_loglik = LogLikelihood()
        self.nll_settings: dict[str, NLLSettings] = {"val": NLLSettings.preset("fast"), "test": NLLSettings.preset("standard")}
        self.nll_report: dict[str, dict[str, str]] = {}  # stage -> how its nll was obtained (estimator, budget)
        self._half_precision_warned: set[str] = set()
        self.eval_seed = 0
        self.run_config: dict[str, Any] | None = None  # the resolved Hydra config, saved in checkpoints

    # ----- what a method provides -------------------------------------------------------------
    @abstractmethod
    def posterior(self, x: Tensor, index: Tensor | None = None) -> Posterior:
        """The method's approximate posterior over z for the batch x (see latentlab.posterior)."""
        raise NotImplementedError(f"{type(self).__name__} must implement posterior(x, index)")

    @torch.no_grad()
    def aggregate_posterior(self, x: Tensor, generator: torch.Generator | None = None, batch_size: int = 500, *,
                            index: Tensor | None = None) -> Tensor:
        """One draw z ~ q(z | x_i) for each row `index` (default all) of the training split x (N, D), in that order,
        (len(index), latent_dim): the aggregate posterior a learned latent prior is fitted to
        (`latentlab.latent_prior`). Methods with stored chains override it."""
        index = torch.arange(x.shape[0], device=x.device) if index is None else index
        return torch.cat([self.posterior(x[ids], ids).sample(1, generator)[0] for ids in index.split(batch_size)])

    def evaluate_batch(self, x: Tensor, index: Tensor) -> dict[str, Tensor]:
        """Per-batch means of the method's own diagnostics (e.g. `elbo`, `kl`, `recon`)."""
        return {}

    def components(self) -> dict[str, torch.nn.Module]:
        """The named parts, so a numerical fault reads "in the decoder" rather than a parameter name: the
        decoder, a learned likelihood, and the attributes listed in the class's `named_parts`."""
        parts: dict[str, torch.nn.Module] = {"decoder": self.model.decoder}
        if any(True for _ in self.model.likelihood.parameters()):
            parts["likelihood"] = self.model.likelihood
        for name in self.named_parts:
            parts[name] = getattr(self, name)
        return parts

    # ----- shared evaluation ------------------------------------------------------------------
    def configure_evaluation(self, val: NLLSettings | Mapping[str, Any] | str | None = None,
                             test: NLLSettings | Mapping[str, Any] | str | None = None, seed: int | None = None) -> None:
        """Set the log p(x) budgets of validation and test (conf: `eval.val_nll`, `eval.nll`) and the seed of
        the evaluation's own random stream (never the training's)."""
        if val is not None:
            self.nll_settings["val"] = NLLSettings.coerce(_plain(val))
        if test is not None:
            self.nll_settings["test"] = NLLSettings.coerce(_plain(test))
        if seed is not None:
            self.eval_seed = int(seed)

    def _eval_key(self, stage: str, batch_idx: int) -> tuple[int, int, int, int]:
        """(stage, epoch, batch, rank): where an evaluation's draws are, so a resumed run makes the same ones."""
        return (STAGE_IDS.get(stage, 0), self.current_epoch if self._trainer else 0, batch_idx,
                self.global_rank if self._trainer else 0)

    def eval_generator(self, stage: str, batch_idx: int, device: torch.device) -> torch.Generator:
        """The evaluation's own stream keyed on (seed, stage, epoch, batch, rank): reproducible on resume."""
        key = (self.eval_seed, *self._eval_key(stage, batch_idx))
        return torch.Generator(device=device).manual_seed(hash(key) % (2**62))

    def _diagnostics_seed(self, stage: str, batch_idx: int) -> int:
        """The seed `evaluate_batch` draws under (its own keyed stream): its numbers are reproducible, and validation
        leaves the training's global stream alone, so a run is the same with validation on, off or more frequent."""
        return key_seed(self.eval_seed, Stream.EVAL_DIAGNOSTICS, *self._eval_key(stage, batch_idx))

    def log_px(self, x: Tensor, index: Tensor | None = None, stage: str = "test",
               generator: torch.Generator | None = None) -> LogPxEstimate:
        """log p(x) per example by the protocol with `stage`'s settings; the one way val, test and eval get it."""
        return estimate_log_px(self.model, x, self.posterior(x, index), self.nll_settings[stage], generator)

    def _eval_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> None:
        with float32_evaluation(batch[0]):
            self._eval_batch(batch, batch_idx, stage)

    def _eval_batch(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> None:
        x, index = batch
        with seeded_global_rng(self._diagnostics_seed(stage, batch_idx), x.device):
            stats = self.evaluate_batch(x, index)
        for name, value in stats.items():
            self.log(f"{stage}/{name}", value, on_step=False, on_epoch=True, batch_size=x.shape[0], sync_dist=True)
        if self._nll_due(stage, batch_idx):
            if self._sanity_checking():  # exercise the estimator before training, not pay its full cost there
                x, index = x[:SANITY_EXAMPLES], index[:SANITY_EXAMPLES]
            estimate = self.log_px(x, index, stage, self.eval_generator(stage, batch_idx, x.device))
            (self.val_loglik if stage == "val" else self.test_loglik).update(estimate.log_px, estimate.log_px_half)
            self.nll_report[stage] = {"estimator": estimate.estimator, "budget": estimate.budget,
                                      "settings": self.nll_settings[stage].name}

    def _nll_due(self, stage: str, batch_idx: int) -> bool:
        spec = self.nll_settings[stage]
        if spec.max_batches is not None and batch_idx >= spec.max_batches:
            return False
        if stage == "val":
            every = spec.val_every_n_epochs
            return every > 0 and (self.current_epoch + 1) % every == 0
        return True

    def _sanity_checking(self) -> bool:
        return self._trainer is not None and self._trainer.sanity_checking

    def _warn_if_half_precision(self, stage: str) -> None:
        """`float32_evaluation` switches autocast off, but `trainer.precision=bf16-true|16-true` store the weights
        themselves in half precision: say so (once per stage) rather than report such a log-likelihood silently.
        latentlab-train/-eval/-cli refuse those precisions up front (config_schema.PRECISIONS); this reaches a
        Trainer of one's own."""
        dtype = next(self.parameters()).dtype
        if dtype in (torch.float32, torch.float64) or stage in self._half_precision_warned:
            return
        self._half_precision_warned.add(stage)
        if self.trainer.is_global_zero:  # called from on_validation_start / on_test_start: a trainer is attached
            latentlab_log.warning("%s metrics are computed with %s weights (trainer.precision=%s): for numbers to "
                                  "report, train with 32-true or a *-mixed precision, or evaluate the checkpoint with "
                                  "latentlab-eval at 32-true", stage, dtype, self.trainer.precision)

    def on_validation_start(self) -> None:
        self._warn_if_half_precision("val")

    def on_test_start(self) -> None:
        self._warn_if_half_precision("test")

    def _log_loglik(self, stage: str) -> None:
        metric = self.val_loglik if stage == "val" else self.test_loglik
        if metric.count > 0 and not self._sanity_checking():
            result = metric.compute()
            for name, value in result.items():
                self.log(f"{stage}/{name}", value, sync_dist=False)
            half_gap = result.get("nll_half_gap", 0.0)
            if stage == "test" or half_gap > CONVERGENCE_FLAG_NATS:
                report = self.nll_report.get(stage, {})
                flag = " NOT CONVERGED (> %.1f nats)" % CONVERGENCE_FLAG_NATS if half_gap > CONVERGENCE_FLAG_NATS else ""
                latentlab_log.info("%s/nll %.4f +/- %.4f by %s (%s); half-budget minus full: %.3f nats%s", stage,
                                   result["nll"], result["nll_se"], report.get("budget", "?"), report.get("settings", "?"),
                                   half_gap, flag)
        metric.reset()

    def evaluation_record(self, stage: str = "test") -> dict[str, str]:
        """How `stage/nll` was obtained, for metrics.json: `<stage>/nll_estimator`, `_budget`, `_settings`."""
        return {f"{stage}/nll_{key}": value for key, value in self.nll_report.get(stage, {}).items()}

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
    def logging_step(self) -> bool:
        """Whether per-step training metrics are logged now: on the steps the loggers write
        (`trainer.log_every_n_steps`) and each epoch's last batch. Logging only then saves `self.log`'s
        bookkeeping and, on a GPU, the host sync of the progress bar reading the value, on the other steps."""
        trainer = self._trainer
        return trainer is None or trainer.is_last_batch or trainer._logger_connector.should_update_logs

    def configure_optimizers(self) -> Any:
        return lightning_optimizers(self.optimizer_factory, self.scheduler_factory, self.parameters())

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
