"""VAE (Kingma & Welling 2014): amortised Gaussian q(z|x), reparameterised ELBO, analytic KL."""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Sequence

from torch import Tensor

from latentlab.errors import ConfigError
from latentlab.models.base import LatentVariableModel, LikelihoodSpec, OptimizerFactory, SchedulerFactory
from latentlab.nets import NetSpec
from latentlab.nets.gaussian import GaussianEncoder, elbo_terms
from latentlab.posterior import GaussianPosterior


class VAE(LatentVariableModel):
    """ELBO = E_q[log p(x|z)] - beta * KL(q(z|x) || p(z)), averaged over `num_samples` reparameterised draws.

    `kl_warmup_epochs` ramps beta linearly from 0 over that many (fractional) epochs, a common fix for
    posterior collapse; validation/test always report the true ELBO (beta = 1).
    """

    method = "vae"
    named_parts = ("encoder",)

    def __init__(
        self,
        data_dim: int,
        latent_dim: int = 8,
        image_shape: Sequence[int] | None = None,
        net: NetSpec | Mapping[str, Any] | None = None,
        likelihood: LikelihoodSpec | Mapping[str, Any] | str | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        num_samples: int = 1,
        beta: float = 1.0,
        kl_warmup_epochs: float = 0.0,
        min_log_var: float = -12.0,
    ) -> None:
        super().__init__(data_dim, latent_dim, image_shape, net, likelihood, optimizer, scheduler)
        if int(num_samples) < 1:
            raise ConfigError(f"model.num_samples must be >= 1, got {num_samples}")
        if beta < 0 or kl_warmup_epochs < 0:
            raise ConfigError(f"model.beta and model.kl_warmup_epochs must be >= 0, got {beta}, {kl_warmup_epochs}")
        self.num_samples, self.beta, self.kl_warmup_epochs = int(num_samples), float(beta), float(kl_warmup_epochs)
        self.encoder = GaussianEncoder.build(self.net_spec, self.data_dim, self.latent_dim, self.image_shape, min_log_var)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "net", "likelihood"])
        self.hparams.update(net=self.net_spec.to_dict(), likelihood=vars(self.likelihood_spec).copy())

    def posterior(self, x: Tensor, index: Tensor | None = None) -> GaussianPosterior:
        """q(z|x) under the posterior contract: a density, the amortized Gaussian and the exact-KL ELBO."""
        return self.encoder.posterior(x, partial(self.model.log_likelihood, x))

    def kl_weight(self) -> float:
        if self.kl_warmup_epochs <= 0 or self._trainer is None:
            return self.beta
        batches = max(1, int(self.trainer.num_training_batches or 1))
        progress = (self.global_step + 1) / (self.kl_warmup_epochs * batches)
        return self.beta * min(1.0, progress)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, _ = batch
        recon, kl = elbo_terms(self.encoder, partial(self.model.log_likelihood, x), x, self.num_samples)
        loss = -(recon - self.kl_weight() * kl).mean()
        if self.logging_step():
            self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def evaluate_batch(self, x: Tensor, index: Tensor) -> dict[str, Tensor]:
        recon, kl = elbo_terms(self.encoder, partial(self.model.log_likelihood, x), x)
        return {"elbo": (recon - kl).mean(), "recon": recon.mean(), "kl": kl.mean()}
