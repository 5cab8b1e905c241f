"""The test protocol, one function for every method: `estimate_log_px(model, x, posterior, settings)`.

Importance sampling with q where the posterior has a density; for a posterior known by draws, importance sampling
from a kernel mixture of its draws in low dimension, else AIS from the Gaussian fitted to them (`NLLSettings`).
Every estimate carries its estimator, its budget and its convergence diagnostic: the same estimate at half the budget (IS: the first k/2 draws; AIS: half the chains), which a converged estimator keeps
within a few hundredths of a nat of the full one. Lightning's val/test steps and `latentlab-eval` both call this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from latentlab.estimators.ais import ais_log_weights
from latentlab.estimators.common import log_mean_exp
from latentlab.estimators.importance import importance_sampling, is_proposal, refine_proposal
from latentlab.estimators.settings import NLLSettings
from latentlab.generative import GenerativeModel
from latentlab.posterior import Posterior

#: a half-budget minus full-budget difference above this many nats means "not converged"; flagged in logs/tables
CONVERGENCE_FLAG_NATS = 0.1


@dataclass
class LogPxEstimate:
    """Per-example log p(x) (batch,) at the full and at half the budget, and how it was obtained."""

    log_px: Tensor
    log_px_half: Tensor
    estimator: str
    budget: str


def estimate_log_px(model: GenerativeModel, x: Tensor, posterior: Posterior | None, settings: NLLSettings,
                    generator: torch.Generator | None = None) -> LogPxEstimate:
    """log p(x) per example by the protocol; `posterior=None` (a method without one) means AIS from the prior."""
    estimator = settings.resolve(posterior is not None and posterior.has_density, model.latent_dim)
    if estimator == "is":
        assert posterior is not None
        proposal = is_proposal(posterior, settings.is_inflation, settings.fit_draws, settings.kde_bandwidth, generator)
        for _ in range(settings.kde_refine if not posterior.has_density else 0):  # rounds of k pilot draws
            proposal = refine_proposal(model.log_joint, x, proposal, settings.k, settings.fit_draws,
                                       settings.kde_bandwidth, settings.is_inflation, settings.chunk_size, generator)
        result = importance_sampling(model.log_joint, x, proposal, settings.k, settings.chunk_size, generator)
        return LogPxEstimate(result.log_px, result.log_px_half, "is",
                             settings.budget("is", from_draws=not posterior.has_density))
    log_w = ais_log_weights(model, x, posterior, settings, generator)
    half = log_mean_exp(log_w[: max(1, log_w.shape[0] // 2)], 0)
    return LogPxEstimate(log_mean_exp(log_w, 0), half, "ais", settings.budget("ais"))
