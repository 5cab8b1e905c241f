"""Bidirectional Monte Carlo (BDMC, Grosse, Ghahramani & Adams 2015): sandwich bounds on log p(x) for data
simulated from the model; their gap says how far the AIS estimate behind `test/nll` is from converged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor
from torch.distributions import Distribution

from latentlab.estimators.ais import AnnealedImportanceSampling
from latentlab.estimators.common import LogJoint, log_mean_exp, mean_and_se, sample_distribution, standard_normal
from latentlab.generative import GenerativeModel

Simulator = Callable[[int, Union[torch.Generator, None]], tuple[Tensor, Tensor]]


@dataclass
class BDMCResult:
    """Sandwich of the mean log p(x) over simulated examples; `*_se` are standard errors over examples."""

    lower: float
    upper: float
    gap: float
    lower_se: float
    upper_se: float
    gap_se: float
    log_px_lower: Tensor
    log_px_upper: Tensor
    x: Tensor
    z: Tensor

    def as_dict(self, prefix: str = "bdmc/") -> dict[str, float]:
        keys = ("lower", "upper", "gap", "lower_se", "upper_se", "gap_se")
        return {f"{prefix}{k}": float(getattr(self, k)) for k in keys}


def simulator_from_model(model: GenerativeModel) -> Simulator:
    """(x, z) ~ p(z) p(x | z) from a `GenerativeModel` (x sampled from the likelihood, not its mean:
    BDMC's upper bound is only valid when z is an exact posterior sample given x)."""

    @torch.no_grad()
    def simulate(n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        z = model.prior.sample(n, generator=generator)
        x = model.likelihood.sample(model.decode(z), generator=generator)
        return x, z

    return simulate


@torch.no_grad()
def bdmc(log_joint: LogJoint, simulate: Simulator | GenerativeModel, n_examples: int, ais: AnnealedImportanceSampling,
         init: Callable[[Tensor], Distribution] | None = None, latent_dim: int | None = None,
         generator: torch.Generator | None = None) -> BDMCResult:
    """Bidirectional Monte Carlo on `n_examples` pairs (x, z) simulated from the model.

    Forward AIS (q0 -> p(z|x)) gives E[log w] <= log p(x). Reverse AIS runs the same path backwards
    starting from the exact posterior sample z (it is one, since (x, z) came from the joint); its
    weights estimate Z_q0 / p(x) = 1 / p(x) unbiasedly, so -log-mean-exp of them is a stochastic
    upper bound. The gap upper - lower bounds the AIS error on data like this (Grosse et al. 2015).

    `simulate(n, generator) -> (x, z)` or a `GenerativeModel`; `ais` the AIS runner (the paper uses 1 chain);
    both directions use the same pilot-tuned step sizes. `init(x)` optionally gives q0 for x, default N(0, I).
    """
    if isinstance(simulate, GenerativeModel):
        latent_dim = latent_dim or simulate.latent_dim
        simulate = simulator_from_model(simulate)
    x, z_true = simulate(n_examples, generator)
    q0 = init(x) if init is not None else standard_normal(x.shape[0], latent_dim or z_true.shape[-1], x)
    step_sizes = ais.tune(log_joint, x, q0, generator)
    z0_fwd = sample_distribution(q0, ais.n_chains, generator)
    log_w_fwd, _ = ais.run(log_joint, x, q0, z0_fwd, step_sizes, generator=generator)
    z0_rev = z_true.to(x).unsqueeze(0).expand(ais.n_chains, *z_true.shape)
    log_w_rev, _ = ais.run(log_joint, x, q0, z0_rev, step_sizes, reverse=True, generator=generator)
    lower, upper = log_mean_exp(log_w_fwd, 0), -log_mean_exp(log_w_rev, 0)
    (lo, lo_se), (up, up_se), (gap, gap_se) = mean_and_se(lower), mean_and_se(upper), mean_and_se(upper - lower)
    return BDMCResult(lo, up, gap, lo_se, up_se, gap_se, lower, upper, x, z_true)
