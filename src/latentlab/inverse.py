"""Inverse problems (inpainting, denoising) solved with a trained model as the prior.

Why two routes: a latent model has a likelihood but no score in x, a denoiser has a score but no
likelihood; each is used where it is exact.

- Latent models (VAE, AVB, ALMOND): Langevin on z targeting p(z | y) ∝ p(y | z) p(z), where p(y | z)
  is the model's own likelihood restricted to the observed pixels (ALMOND's E-step with a mask), or
  N(y; E[x | z], noise^2 I) for denoising; then decode, and keep the observed pixels.
- Denoisers: annealed Langevin on x with the measurement term grad log p(y | x) at level sigma,
  M (y - x) / (s_y^2 + sigma^2) (observation noise s_y plus the level's own; Jalal et al. 2021).

Masks are 1 where a pixel is observed. Metrics are over the hidden pixels (all pixels for denoising).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from latentlab.errors import ConfigError
from latentlab.generative import GenerativeModel
from latentlab.samplers.score import MeasurementFn

MASKS = ("bottom_half", "left_half", "random")
LogObs = Callable[[Tensor], Tensor]
"""z (..., batch, d) -> log p(observation | z) up to a constant, (..., batch)."""


def make_mask(kind: str, n: int, data_dim: int, image_shape: Sequence[int] | None = None,
              generator: torch.Generator | None = None, keep: float = 0.5) -> Tensor:
    """(n, data_dim) float mask, 1 = observed: hide the bottom or left half of each image, or each
    pixel independently with probability 1 - keep (`random`, which works for any data)."""
    if kind not in MASKS:
        raise ConfigError(f"mask={kind!r} is not a mask; choose one of {'|'.join(MASKS)}")
    if kind == "random":
        return (torch.rand(n, data_dim, generator=generator) < keep).float()
    if image_shape is None or len(image_shape) != 3:
        raise ConfigError(f"mask={kind} needs image data (this dataset has no image_shape); use mask=random")
    c, h, w = (int(s) for s in image_shape)
    rows = torch.arange(h).view(h, 1).expand(h, w)
    cols = torch.arange(w).view(1, w).expand(h, w)
    seen = rows < h // 2 if kind == "bottom_half" else cols >= w // 2
    return seen.float().expand(c, h, w).reshape(1, -1).expand(n, -1).clone()


def masked_log_likelihood(model: GenerativeModel, y: Tensor, mask: Tensor) -> LogObs:
    """z -> log p(y_observed | z) + a constant, for any factorised likelihood of the model.

    Hidden entries of both y and the decoder's parameters are replaced by the constant 0, so they add
    a term that does not depend on z (log 1/2 for a Bernoulli, a Gaussian's normaliser): the gradient
    is exactly that of the observed pixels' log-likelihood, with no per-likelihood code here.
    """
    observed = mask.bool()
    y0 = torch.where(observed, y, torch.zeros_like(y))
    params_seen = torch.cat([observed] * model.likelihood.param_multiplier, -1)

    def log_obs(z: Tensor) -> Tensor:
        params = model.decode(z)
        return model.likelihood.log_prob(y0, torch.where(params_seen, params, torch.zeros_like(params)))

    return log_obs


def gaussian_observation(model: GenerativeModel, y: Tensor, noise: float) -> LogObs:
    """z -> log N(y; E[x | z], noise^2 I) + const: the observation model of `task=denoise`."""
    def log_obs(z: Tensor) -> Tensor:
        return -0.5 * (y - model.likelihood.mean(model.decode(z))).square().sum(-1) / noise**2

    return log_obs


@torch.no_grad()
def latent_completions(model: GenerativeModel, y: Tensor, mask: Tensor, log_obs: LogObs, sampler: object,
                       n_chains: int = 1, generator: torch.Generator | None = None, completion: str = "mean") -> Tensor:
    """(n_chains, batch, D): x from z ~ p(z | y) by `sampler` (a `latentlab.samplers` Langevin sampler,
    chains started at the prior), decoded to E[x | z] (`mean`) or drawn from p(x | z) (`sample`), with
    the observed pixels of y kept."""
    if completion not in ("mean", "sample"):
        raise ConfigError(f"completion must be mean|sample, got {completion!r}")
    z0 = torch.randn(n_chains, y.shape[0], model.latent_dim, generator=generator, device=y.device, dtype=y.dtype)
    z = sampler.sample(lambda v: log_obs(v) + model.prior.log_prob(v), z0, generator).z  # type: ignore[attr-defined]
    params = model.decode(z)
    x = model.likelihood.mean(params) if completion == "mean" else model.likelihood.sample(params, generator)
    return mask * y + (1.0 - mask) * x


def score_measurement(y: Tensor, mask: Tensor, obs_noise: float) -> MeasurementFn:
    """(x, sigma) -> mask * (y - x) / (obs_noise^2 + sigma^2): grad log p(y | x) at noise level sigma."""
    def measurement(x: Tensor, sigma: float) -> Tensor:
        return mask * (y - x) / (obs_noise**2 + sigma**2)

    return measurement


@torch.no_grad()
def red_map(denoise: Callable[[Tensor, float], Tensor], y: Tensor, mask: Tensor, sigma: float, obs_noise: float,
            n_steps: int = 200, step: float | None = None) -> Tensor:
    """Regularization by denoising (the lecture's RED), the MAP alternative to sampling: gradient descent on
    ||M (x - y)||^2 / (2 s_y^2) + x^T (x - D(x, sigma)) / (2 sigma^2), whose gradient (for a denoiser with a
    symmetric Jacobian that is locally homogeneous) is M (x - y) / s_y^2 + (x - D(x, sigma)) / sigma^2, i.e.
    minus the log posterior's with Tweedie's score at sigma. Step 1 / (1 / s_y^2 + 1 / sigma^2) by default
    (stable for a passive denoiser); starts at the observation with hidden pixels at 0.5."""
    precision = 1.0 / obs_noise**2 + 1.0 / sigma**2
    step = 1.0 / precision if step is None else float(step)
    x = mask * y + (1.0 - mask) * 0.5
    for _ in range(int(n_steps)):
        x = x - step * (mask * (x - y) / obs_noise**2 + (x - denoise(x, sigma)) / sigma**2)
    return x


def hidden_pixel_metrics(x: Tensor, target: Tensor, mask: Tensor, peak: float = 1.0) -> dict[str, float]:
    """MSE over the hidden pixels (x (..., batch, D) against target (batch, D)) (all pixels where none is hidden) and PSNR = 10 log10(peak^2 / MSE)."""
    hidden = 1.0 - mask if bool((mask < 1).any()) else torch.ones_like(mask)
    copies = x.numel() // target.numel()  # x may carry leading chain dims
    mse = float(((x - target) ** 2 * hidden).sum() / (hidden.sum().clamp(min=1) * copies))
    return {"mse": mse, "psnr": 10.0 * math.log10(peak**2 / mse) if mse > 0 else math.inf}
