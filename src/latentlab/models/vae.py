"""VAE (Kingma & Welling 2014): amortised Gaussian q(z|x), reparameterised ELBO, analytic KL."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor
from torch.distributions import Independent, Normal

from latentlab.errors import ConfigError
from latentlab.models.base import EvalSpec, LatentVariableModel, LikelihoodSpec, OptimizerFactory, SchedulerFactory
from latentlab.nets import NetSpec, build_encoder


def gaussian_kl_to_standard_normal(mu: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mu, diag exp(log_var)) || N(0, I)) summed over the last dim, in closed form."""
    return 0.5 * (mu.pow(2) + log_var.exp() - 1.0 - log_var).sum(-1)


class VAE(LatentVariableModel):
    """ELBO = E_q[log p(x|z)] - beta * KL(q(z|x) || p(z)), averaged over `num_samples` reparameterised draws.

    `kl_warmup_epochs` ramps beta linearly from 0 over that many (fractional) epochs, a common fix for
    posterior collapse; validation/test always report the true ELBO (beta = 1).
    """

    method = "vae"

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
        num_samples: int = 1,
        beta: float = 1.0,
        kl_warmup_epochs: float = 0.0,
        min_log_var: float = -12.0,
    ) -> None:
        super().__init__(data_dim, latent_dim, image_shape, net, likelihood, optimizer, scheduler, eval)
        if int(num_samples) < 1:
            raise ConfigError(f"model.num_samples must be >= 1, got {num_samples}")
        if beta < 0 or kl_warmup_epochs < 0:
            raise ConfigError(f"model.beta and model.kl_warmup_epochs must be >= 0, got {beta}, {kl_warmup_epochs}")
        self.num_samples, self.beta, self.kl_warmup_epochs = int(num_samples), float(beta), float(kl_warmup_epochs)
        self.min_log_var = min_log_var
        self.encoder = build_encoder(self.net_spec, self.data_dim, 2 * self.latent_dim, self.image_shape)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "net", "likelihood", "eval"])
        self.hparams.update(net=self.net_spec.to_dict(), likelihood=vars(self.likelihood_spec).copy(),
                            eval=vars(self.eval_spec).copy())

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_var = self.encoder(x).chunk(2, dim=-1)
        return mu, log_var.clamp(min=self.min_log_var)

    def proposal(self, x: Tensor, index: Tensor | None = None) -> Independent:
        mu, log_var = self.encode(x)
        return Independent(Normal(mu, torch.exp(0.5 * log_var)), 1)

    def amortized_gaussian(self, x: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.encode(x)

    @torch.no_grad()
    def elbo_estimate(self, x: Tensor, index: Tensor | None = None, k: int = 100,
                      generator: torch.Generator | None = None, chunk_size: int = 100) -> Tensor:
        """The VAE's own bound with the exact KL: (1/k) sum_i log p(x | z_i) - KL(q(z|x) || p(z)), z_i ~ q,
        drawn `chunk_size` at a time (memory chunk_size x batch x data_dim)."""
        mu, log_var = self.encode(x)
        std, recon = torch.exp(0.5 * log_var), torch.zeros_like(mu[..., 0])
        for start in range(0, k, chunk_size):
            eps = torch.randn((min(chunk_size, k - start), *mu.shape), generator=generator, dtype=mu.dtype, device=mu.device)
            recon += self.model.log_likelihood(x, mu + std * eps).sum(0)
        return recon / k - gaussian_kl_to_standard_normal(mu, log_var)

    def elbo_terms(self, x: Tensor, num_samples: int = 1) -> tuple[Tensor, Tensor]:
        """(E_q log p(x|z), KL) per example, the expectation over `num_samples` reparameterised draws."""
        mu, log_var = self.encode(x)
        # one draw: no sample dim, so the hot path has no broadcast or reshape (see benchmarks/vae_mnist.py)
        shape = mu.shape if num_samples == 1 else (num_samples, *mu.shape)
        z = mu + torch.exp(0.5 * log_var) * torch.randn(shape, dtype=mu.dtype, device=mu.device)
        recon = self.model.log_likelihood(x, z)
        return (recon if num_samples == 1 else recon.mean(0)), gaussian_kl_to_standard_normal(mu, log_var)

    def kl_weight(self) -> float:
        if self.kl_warmup_epochs <= 0 or self._trainer is None:
            return self.beta
        batches = max(1, int(self.trainer.num_training_batches or 1))
        progress = (self.global_step + 1) / (self.kl_warmup_epochs * batches)
        return self.beta * min(1.0, progress)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, _ = batch
        recon, kl = self.elbo_terms(x, self.num_samples)
        loss = -(recon - self.kl_weight() * kl).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def evaluate_batch(self, x: Tensor, index: Tensor) -> dict[str, Tensor]:
        recon, kl = self.elbo_terms(x, 1)
        return {"elbo": (recon - kl).mean(), "recon": recon.mean(), "kl": kl.mean()}
