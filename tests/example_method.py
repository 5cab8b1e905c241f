"""The smallest inference method: the prior as the posterior (a baseline every method should beat).

It is what docs/architecture.md promises: one file implementing the posterior contract, plus a config (here
the test's overrides). The decoder is trained on the importance-weighted bound with the prior as proposal,
log (1/k) sum_i p(x | z_i), z_i ~ p(z); its posterior is N(0, I) for every x, a Gaussian with a density,
so the evaluator uses importance sampling and the gap code gets its amortized Gaussian, unasked.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import Tensor

from latentlab.models.base import LatentVariableModel
from latentlab.posterior import GaussianPosterior


class PriorAsPosterior(LatentVariableModel):
    """q(z|x) = p(z) = N(0, I); the decoder maximises log mean_i p(x | z_i) over k prior draws."""

    method = "prior"

    def __init__(self, *args: Any, k: int = 8, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.k = int(k)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])

    def posterior(self, x: Tensor, index: Tensor | None = None) -> GaussianPosterior:
        zeros = torch.zeros(x.shape[0], self.latent_dim, device=x.device, dtype=x.dtype)
        return GaussianPosterior(zeros, zeros, partial(self.model.log_likelihood, x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, index = batch
        log_lik = self.model.log_likelihood(x, self.posterior(x, index).sample(self.k))
        loss = -(torch.logsumexp(log_lik, 0) - math.log(self.k)).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss
