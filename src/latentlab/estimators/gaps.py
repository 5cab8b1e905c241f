"""Inference suboptimality (Cremer, Li & Duvenaud 2018): why is a method's bound below log p(x)?

    log p(x) - ELBO[q_amortized]  =  (log p(x) - ELBO[q*])  +  (ELBO[q*] - ELBO[q_amortized])
         inference gap             =   approximation gap     +     amortization gap

q* is the best diagonal Gaussian for each x alone ("FFG"), optimised here to a stated convergence
criterion (`GapSettings`); examples that do not meet it are counted, never silently reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch
from torch import Tensor

from latentlab.errors import ConfigError
from latentlab.estimators.common import LogJoint, mean_and_se
from latentlab.estimators.settings import GapSettings
from latentlab.posterior import gaussian_elbo, gaussian_log_prob


def gaussian_log_weights(log_joint: LogJoint, x: Tensor, mu: Tensor, log_var: Tensor, k: int,
                         generator: torch.Generator | None = None, stick_the_landing: bool = False,
                         eps: Tensor | None = None) -> Tensor:
    """log p(x, z) - log q(z) at k reparameterised draws z = mu + sigma * eps: (k, batch).

    With `stick_the_landing` (Roeder, Wu & Duvenaud 2017) log q uses detached parameters: same expected
    gradient, zero variance when q is the posterior. `eps` (k, batch, d) fixes the draws (common random numbers).
    """
    if eps is None:
        eps = torch.randn((k, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + torch.exp(0.5 * log_var) * eps
    q_mu, q_log_var = (mu.detach(), log_var.detach()) if stick_the_landing else (mu, log_var)
    return log_joint(x, z) - gaussian_log_prob(z, q_mu, q_log_var)


@dataclass
class LocalGaussian:
    """The best per-example Gaussian: detached (mu, log_var, elbo), each example's `converged` flag and the
    steps taken. Unpacks as (mu, log_var, elbo)."""

    mu: Tensor
    log_var: Tensor
    elbo: Tensor
    converged: Tensor
    steps: int

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.mu, self.log_var, self.elbo))


def fit_local_gaussian(log_joint: LogJoint, x: Tensor, mu0: Tensor, log_var0: Tensor, steps: int | None = None,
                       lr: float | None = None, k: int | None = None, eval_k: int | None = None,
                       generator: torch.Generator | None = None, settings: GapSettings | None = None) -> LocalGaussian:
    """Per-example Gaussian q*(z|x) maximising the ELBO, started from (mu0, log_var0) (the encoder, or the prior).

    Adam on the reparameterised ELBO with fresh draws each step (sticking-the-landing gradient). Every
    `local_check_every` steps the ELBO is measured on one fixed set of `local_k` draws (common random numbers,
    so the change is the optimiser's, not the noise's); an example whose gain is below `local_tol` is
    converged and frozen. At the end (all converged or `steps` reached) the learning rate is annealed to 0
    over one window to settle the stochastic-gradient jitter. Only mu and log_var get gradients; works under
    `no_grad`. The explicit arguments override `settings` (default `GapSettings()`).
    """
    s = settings or GapSettings()
    steps = s.local_steps if steps is None else steps
    lr, k, eval_k = lr or s.local_lr, k or s.local_k, eval_k or s.local_eval_k
    if steps < 0 or k < 1 or lr <= 0:
        raise ConfigError(f"fit_local_gaussian needs steps >= 0, k >= 1, lr > 0; got {steps}, {k}, {lr}")
    mu = mu0.detach().clone().requires_grad_(True)
    log_var = log_var0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([mu, log_var], lr=lr)
    check_eps = torch.randn((max(k, 64), *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    active = torch.ones(mu.shape[:-1], dtype=torch.bool, device=mu.device)
    converged = torch.zeros_like(active)

    def step(scale: float) -> None:
        for group in opt.param_groups:
            group["lr"] = lr * scale
        with torch.enable_grad():
            log_w = gaussian_log_weights(log_joint, x, mu, log_var, k, generator, stick_the_landing=True)
            grads = torch.autograd.grad(-log_w.mean(0).sum(), [mu, log_var])  # per-example sums stay independent
        for p, g in zip((mu, log_var), grads, strict=True):
            p.grad = g * active[..., None]
        opt.step()

    def check_value() -> Tensor:
        with torch.no_grad():
            return gaussian_log_weights(log_joint, x, mu, log_var, check_eps.shape[0], eps=check_eps).mean(0)

    window, taken = s.local_check_every, 0
    last = check_value()
    while taken < steps and bool(active.any()):
        for _ in range(min(window, steps - taken)):
            step(1.0)
        taken += min(window, steps - taken)
        now = check_value()
        newly = active & ((now - last) < s.local_tol)
        converged |= newly
        active &= ~newly
        last = now
    active = torch.ones_like(active)  # settle every example: a short annealed window
    for i in range(min(window, steps)):
        step(1.0 - (i + 1) / (window + 1))
    mu, log_var = mu.detach(), log_var.detach()
    with torch.no_grad():
        elbo = gaussian_elbo(partial(log_joint, x), mu, log_var, eval_k, generator)
    return LocalGaussian(mu, log_var, elbo, converged, taken)


def per_example_gaps(log_px: Tensor, elbo: Tensor, elbo_local: Tensor | None = None, elbo_key: str = "elbo",
                     caller: str = "per_example_gaps") -> dict[str, Tensor]:
    """The Cremer et al. decomposition per example: `log_px`, the method's bound (under `elbo_key`), `inference_gap`
    = log p(x) - bound; with `elbo_local` (the best local Gaussian's ELBO) also `elbo_local`, `approximation_gap` =
    log p(x) - ELBO[q*] and `amortization_gap` = ELBO[q*] - bound. The one definition behind `inference_gaps` and
    the `metrics.InferenceGap` Metric."""
    if log_px.shape != elbo.shape or (elbo_local is not None and elbo_local.shape != log_px.shape):
        raise ConfigError(f"{caller} needs per-example tensors of one shape (batch,)")
    values = {"log_px": log_px, elbo_key: elbo, "inference_gap": log_px - elbo}
    if elbo_local is not None:
        values |= {"elbo_local": elbo_local, "approximation_gap": log_px - elbo_local, "amortization_gap": elbo_local - elbo}
    return values


def inference_gaps(log_px: Tensor, elbo_amortized: Tensor, elbo_local: Tensor | None = None) -> dict[str, float]:
    """Means over examples (and standard errors `*_se`) of `per_example_gaps`, the bound as `elbo_amortized`."""
    per_example = per_example_gaps(log_px, elbo_amortized, elbo_local, "elbo_amortized", "inference_gaps")
    out: dict[str, float] = {}
    for name, values in per_example.items():
        out[name], out[f"{name}_se"] = mean_and_se(values.detach().double())
    return out
