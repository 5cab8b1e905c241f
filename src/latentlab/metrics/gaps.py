"""Inference suboptimality (Cremer, Li & Duvenaud 2018): why is a model's ELBO below log p(x)?

    log p(x) - ELBO[q_amortized]  =  (log p(x) - ELBO[q*])  +  (ELBO[q*] - ELBO[q_amortized])
         inference gap             =   approximation gap     +     amortization gap

q* is the best member of the variational family for each x separately, found here by optimising a
per-example Gaussian's mean and log-variance (the paper's "FFG" family). The approximation gap is
the cost of the family, the amortization gap the cost of sharing one encoder across examples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.distributions import Independent, Normal

from latentlab.errors import ConfigError
from latentlab.metrics.loglik import mean_and_se

LogJoint = Callable[[Tensor, Tensor], Tensor]


def gaussian_log_weights(
    log_joint: LogJoint,
    x: Tensor,
    mu: Tensor,
    log_var: Tensor,
    k: int,
    generator: torch.Generator | None = None,
    stick_the_landing: bool = False,
) -> Tensor:
    """log p(x, z) - log q(z) at k reparameterised draws z = mu + sigma * eps: (k, batch).

    With `stick_the_landing` (Roeder, Wu & Duvenaud 2017) log q is evaluated with detached
    parameters: same expected gradient, but zero variance when q equals the posterior, so the
    local optimisation converges instead of jittering around the optimum.
    """
    std = torch.exp(0.5 * log_var)
    eps = torch.randn((k, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + std * eps
    q_mu, q_std = (mu.detach(), std.detach()) if stick_the_landing else (mu, std)
    return log_joint(x, z) - Independent(Normal(q_mu, q_std), 1).log_prob(z)


def gaussian_elbo(
    log_joint: LogJoint,
    x: Tensor,
    mu: Tensor,
    log_var: Tensor,
    k: int = 1,
    generator: torch.Generator | None = None,
    chunk_size: int = 256,
) -> Tensor:
    """Monte Carlo ELBO E_q[log p(x, z) - log q(z)] of q = N(mu, diag exp(log_var)), shape (batch,).

    Uses the sampled log q rather than the analytic entropy: the estimator then has zero variance
    when q is the exact posterior, which is what makes a vanishing approximation gap measurable.
    Differentiable w.r.t. mu and log_var (reparameterisation); drawn in chunks of `chunk_size`.
    """
    if k < 1:
        raise ConfigError(f"gaussian_elbo needs k >= 1, got {k}")
    total = torch.zeros(mu.shape[:-1], device=mu.device, dtype=mu.dtype)
    for start in range(0, k, chunk_size):
        n = min(chunk_size, k - start)
        total = total + gaussian_log_weights(log_joint, x, mu, log_var, n, generator).sum(0)
    return total / k


def fit_local_gaussian(
    log_joint: LogJoint,
    x: Tensor,
    mu0: Tensor,
    log_var0: Tensor,
    steps: int = 500,
    lr: float = 1e-2,
    k: int = 10,
    eval_k: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example Gaussian q*(z|x) maximising the ELBO, started from (mu0, log_var0) (e.g. the encoder).

    Adam on the reparameterised ELBO (k samples per step, sticking-the-landing gradient), learning
    rate cosine-annealed to 0 so the noisy optimum settles. Gradients are taken w.r.t. mu and
    log_var only: the model's parameters are untouched and get no `.grad`. Works under `no_grad`.
    Returns detached (mu, log_var, elbo) with the ELBO re-estimated from `eval_k` fresh samples.
    """
    if steps < 0 or k < 1 or lr <= 0:
        raise ConfigError(f"fit_local_gaussian needs steps >= 0, k >= 1, lr > 0; got {steps}, {k}, {lr}")
    mu = mu0.detach().clone().requires_grad_(True)
    log_var = log_var0.detach().clone().requires_grad_(True)
    params = [mu, log_var]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    with torch.enable_grad():
        for _ in range(steps):
            log_w = gaussian_log_weights(log_joint, x, mu, log_var, k, generator, stick_the_landing=True)
            # Summing over examples keeps each example's gradient independent of the batch size.
            grads = torch.autograd.grad(-log_w.mean(0).sum(), params)
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()
            sched.step()
    mu, log_var = mu.detach(), log_var.detach()
    with torch.no_grad():
        elbo = gaussian_elbo(log_joint, x, mu, log_var, eval_k, generator)
    return mu, log_var, elbo


def inference_gaps(log_px: Tensor, elbo_amortized: Tensor, elbo_local: Tensor | None = None) -> dict[str, float]:
    """Means over examples (and standard errors `*_se`) of the Cremer et al. decomposition.

    Always: `log_px`, `elbo_amortized`, `inference_gap` = log p(x) - ELBO[q_amortized]. With
    `elbo_local` also `approximation_gap` = log p(x) - ELBO[q*] and `amortization_gap` =
    ELBO[q*] - ELBO[q_amortized]; the two sum to the inference gap.
    """
    if log_px.shape != elbo_amortized.shape or (elbo_local is not None and elbo_local.shape != log_px.shape):
        raise ConfigError("inference_gaps needs per-example tensors of one shape (batch,)")
    per_example = {"log_px": log_px, "elbo_amortized": elbo_amortized, "inference_gap": log_px - elbo_amortized}
    if elbo_local is not None:
        per_example |= {
            "elbo_local": elbo_local,
            "approximation_gap": log_px - elbo_local,
            "amortization_gap": elbo_local - elbo_amortized,
        }
    out: dict[str, float] = {}
    for name, values in per_example.items():
        out[name], out[f"{name}_se"] = mean_and_se(values.detach().double())
    return out
