"""Posterior quality, judged the same way for every method (VAE, AVB, ALMOND, ...).

- The inference gap (Cremer, Li & Duvenaud 2018): log p(x) (AIS) minus the method's own per-example
  bound `elbo_estimate` (the VAE's exact-KL ELBO, AVB's discriminator-based estimate, for ALMOND the
  ELBO of a Gaussian fitted to its Langevin samples). Methods with an amortized Gaussian posterior
  also get its split into the approximation gap (the best per-example Gaussian, optimised for that
  x alone, is still below log p(x)) and the amortization gap (the shared encoder is below that best
  Gaussian).
- BDMC (Grosse et al. 2015) on data simulated from the model: sandwich bounds on log p(x) whose gap
  says how far to trust the AIS number.
- For 2-d latents: pictures of the exact posterior (quadrature on a grid) beside the method's own
  posterior draws, per example.

Everything takes the LightningModule duck-typed through the hooks of
`latentlab.models.base.LatentVariableModel`: `model` (the GenerativeModel), `eval_spec`, `log_px`,
`posterior_draws`, `elbo_estimate`, `amortized_gaussian`, `ais_start`. The accumulators are
torchmetrics `Metric`s (per-example states gathered across processes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor
from torch.distributions import Distribution
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from latentlab.errors import ConfigError
from latentlab.metrics.gaps import fit_local_gaussian, gaussian_elbo, inference_gaps
from latentlab.metrics.grid import grid_log_joint, latent_grid
from latentlab.metrics.loglik import AnnealedImportanceSampling, bdmc, mean_and_se

Batch = tuple[Tensor, Tensor]


def fitted_gaussian(draws: Tensor, min_std: float = 1e-3) -> tuple[Tensor, Tensor]:
    """(mu, log_var) (batch, d) of the diagonal Gaussian matching the moments of draws (n, batch, d).

    Moment matching is the maximum-likelihood Gaussian fit of the draws; no inflation here (unlike an
    IS proposal) because its ELBO should describe the samples, not hedge against them.
    """
    if draws.dim() != 3 or draws.shape[0] < 2:
        raise ConfigError(f"posterior draws must be (n >= 2, batch, d), got {tuple(draws.shape)}")
    return draws.mean(0), draws.var(0).clamp(min=min_std**2).log()


@torch.no_grad()
def fitted_gaussian_elbo(log_joint: Callable[[Tensor, Tensor], Tensor], x: Tensor, draws: Tensor, k: int = 100,
                         generator: torch.Generator | None = None) -> Tensor:
    """ELBO (batch,) of the diagonal Gaussian fitted to posterior draws (n, batch, d): a true lower bound
    on log p(x) for a sampler-based method without a density of its own (ALMOND's Langevin chains),
    E_q[log p(x, z)] + H(q), and log p(x) minus it says how well a Gaussian summarises the samples."""
    mu, log_var = fitted_gaussian(draws.detach())
    return gaussian_elbo(log_joint, x, mu, log_var, k=k, generator=generator)


# --------------------------------------------------------------------------- metrics


# inference_gaps' names -> report keys (ALMOND's bound is not amortized, so no "amortized" in the key)
_GAP_NAMES = {"log_px": "gap_log_px", "elbo_amortized": "gap_elbo", "elbo_local": "gap_elbo_local"}


class InferenceGap(Metric):
    """Per-example log p(x), the method's bound and (optionally) the best local Gaussian's ELBO, reduced by
    `latentlab.metrics.gaps.inference_gaps` into means +/- standard errors: `inference_gap` and, when
    `elbo_local` was given, `approximation_gap` + `amortization_gap` (which sum to it)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("log_px", "elbo", "elbo_local"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, log_px: Tensor, elbo: Tensor, elbo_local: Tensor | None = None) -> None:
        if log_px.shape != elbo.shape or (elbo_local is not None and elbo_local.shape != log_px.shape):
            raise ConfigError("InferenceGap.update needs per-example tensors of one shape (batch,)")
        self.log_px.append(log_px.detach().double())
        self.elbo.append(elbo.detach().double())
        if elbo_local is not None:
            self.elbo_local.append(elbo_local.detach().double())

    def compute(self) -> dict[str, float]:
        log_px, elbo = dim_zero_cat(self.log_px), dim_zero_cat(self.elbo)
        local = dim_zero_cat(self.elbo_local) if len(self.elbo_local) else None
        if local is not None and local.shape != log_px.shape:
            raise ConfigError("InferenceGap got elbo_local for some batches only")
        out: dict[str, float] = {}
        for key, value in inference_gaps(log_px, elbo, local).items():
            name, se = (key[:-3], "_se") if key.endswith("_se") else (key, "")
            out[_GAP_NAMES.get(name, name) + se] = value
        return out


class BDMCBounds(Metric):
    """Per-example BDMC bounds on simulated data: `bdmc_lower` (forward AIS, a stochastic lower bound on
    the mean log p(x)), `bdmc_upper` (reverse AIS from the exact posterior sample, a stochastic upper
    bound) and `bdmc_gap` = upper - lower, each with a standard error over examples (`*_se`)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("lower", default=[], dist_reduce_fx="cat")
        self.add_state("upper", default=[], dist_reduce_fx="cat")

    def update(self, lower: Tensor, upper: Tensor) -> None:
        self.lower.append(lower.detach().double().reshape(-1))
        self.upper.append(upper.detach().double().reshape(-1))

    def compute(self) -> dict[str, float]:
        lower, upper = dim_zero_cat(self.lower), dim_zero_cat(self.upper)
        out: dict[str, float] = {}
        for name, values in (("bdmc_lower", lower), ("bdmc_upper", upper), ("bdmc_gap", upper - lower)):
            out[name], out[f"{name}_se"] = mean_and_se(values)
        return out


# --------------------------------------------------------------------------- inference gap


@dataclass
class GapSettings:
    """`elbo_k`: samples for each method's per-example bound (its `elbo_estimate`, which bounds its own
    memory). The local Gaussian q*: `local_steps` Adam steps at `local_lr` with `local_k` samples each,
    its ELBO re-estimated from `local_eval_k` samples (Cremer et al. optimise each example's Gaussian
    to convergence). `max_elements` bounds elbo_k x examples x data_dim per `elbo_estimate` call."""

    elbo_k: int = 1000
    local_steps: int = 500
    local_lr: float = 1e-2
    local_k: int = 10
    local_eval_k: int = 1000
    max_elements: int = 2**24

    def __post_init__(self) -> None:
        for key in ("elbo_k", "local_k", "local_eval_k", "max_elements"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"eval.gap.{key} must be >= 1, got {getattr(self, key)}")
        if int(self.local_steps) < 0 or not self.local_lr > 0:
            raise ConfigError(f"eval.gap.local_steps must be >= 0 and local_lr > 0, got {self.local_steps}, {self.local_lr}")


def gap_terms(module: Any, x: Tensor, index: Tensor | None, settings: GapSettings,
              generator: torch.Generator | None = None) -> dict[str, Tensor] | None:
    """Per-example `log_px` (AIS), `elbo` (the method's bound) and, for amortized Gaussian methods,
    `elbo_local` (the best per-example Gaussian, started at the encoder's); None if the method has no bound."""
    # examples per elbo_estimate call such that k x examples x data_dim stays under max_elements: a method
    # may draw all k samples at once (AVB's discriminator estimate does)
    step = max(1, settings.max_elements // (settings.elbo_k * max(1, x[0].numel())))
    with torch.no_grad():
        parts = [module.elbo_estimate(x[i: i + step], None if index is None else index[i: i + step],
                                      k=settings.elbo_k, generator=generator) for i in range(0, x.shape[0], step)]
    if any(p is None for p in parts):
        return None
    elbo = torch.cat(parts)
    out = {"log_px": module.log_px(x, index, estimator="ais", generator=generator).detach(), "elbo": elbo.detach()}
    with torch.no_grad():
        gaussian = module.amortized_gaussian(x, index)
    if gaussian is not None:
        _, _, out["elbo_local"] = fit_local_gaussian(
            module.model.log_joint, x, *gaussian, steps=settings.local_steps, lr=settings.local_lr,
            k=settings.local_k, eval_k=settings.local_eval_k, generator=generator)
    return out


def inference_gap_metrics(module: Any, batches: Iterable[Batch], settings: GapSettings | None = None,
                          generator: torch.Generator | None = None, metric: InferenceGap | None = None
                          ) -> dict[str, float] | None:
    """Run `gap_terms` over `batches` of (x, index) and reduce them; None if the method has no bound."""
    settings = settings or GapSettings()
    metric = metric if metric is not None else InferenceGap()
    for x, index in batches:
        terms = gap_terms(module, x, index, settings, generator)
        if terms is None:
            return None
        metric.update(terms["log_px"], terms["elbo"], terms.get("elbo_local"))
    return metric.compute()


# --------------------------------------------------------------------------- BDMC


def bdmc_metrics(module: Any, n_examples: int, ais: AnnealedImportanceSampling, batch_size: int = 100,
                 generator: torch.Generator | None = None, use_ais_start: bool = True) -> dict[str, float]:
    """BDMC on `n_examples` pairs (x, z) simulated from the module's generative model, `batch_size` at a time.

    The AIS settings should be those behind the reported log p(x): its gap then bounds that estimate's
    error on data like these (with 1 chain here and K chains there it is a conservative bound, since
    E log mean of K weights >= E log of one). `use_ais_start`: q0 = the module's `ais_start` (the prior
    unless `eval_spec.ais_init=posterior`), the same start the test-set AIS uses.
    """
    if n_examples < 1 or batch_size < 1:
        raise ConfigError(f"BDMC needs n_examples >= 1 and batch_size >= 1, got {n_examples}, {batch_size}")
    model = module.model
    init: Callable[[Tensor], Distribution | None] | None = (
        (lambda x: module.ais_start(x, None)) if use_ais_start and hasattr(module, "ais_start") else None)
    metric = BDMCBounds()
    for start in range(0, n_examples, batch_size):
        result = bdmc(model.log_joint, model, min(batch_size, n_examples - start), ais=ais, init=init,
                      latent_dim=model.latent_dim, generator=generator)
        metric.update(result.log_px_lower, result.log_px_upper)
    return metric.compute()


# --------------------------------------------------------------------------- 2-d pictures


@dataclass
class PosteriorPicture:
    """One example's exact posterior on a grid zoomed to where its mass is, and the method's draws."""

    density: Tensor          # (resolution, resolution) cell probabilities, indexed [y, x]
    extent: tuple[float, float, float, float]
    draws: Tensor | None     # (n, 2) or None


@torch.no_grad()
def zoomed_posteriors(model: Any, x: Tensor, limit: float = 6.0, resolution: int = 121,
                      zoom: float = 4.0) -> list[tuple[Tensor, tuple[float, float, float, float]]]:
    """Exact p(z|x) per example on a grid centred on its mean, +/- `zoom` posterior stds (found on a
    coarse grid over [-limit, limit]^2): real-data posteriors are often far narrower than the prior,
    and a fixed prior-wide grid would draw them as a single cell."""
    z, _, _ = latent_grid(limit, resolution, x.device, x.dtype)
    coarse = torch.softmax(grid_log_joint(model, x, z), dim=0)  # (G, batch)
    mean = coarse.T @ z                                           # (batch, 2)
    var = coarse.T @ z.pow(2) - mean.pow(2)
    cell = 2.0 * limit / resolution
    half = (zoom * var.clamp(min=0).sqrt().max(-1).values).clamp(min=2.0 * cell, max=limit)
    out = []
    for i in range(x.shape[0]):
        offsets, _, _ = latent_grid(float(half[i]), resolution, x.device, x.dtype)
        centre = mean[i]
        probs = torch.softmax(grid_log_joint(model, x[i: i + 1], centre + offsets)[:, 0], dim=0)
        cx, cy, h = float(centre[0]), float(centre[1]), float(half[i])
        out.append((probs.reshape(resolution, resolution).cpu(), (cx - h, cx + h, cy - h, cy + h)))
    return out


def posterior_pictures(module: Any, x: Tensor, index: Tensor | None, n_draws: int = 500, limit: float = 6.0,
                       resolution: int = 121, generator: torch.Generator | None = None) -> list[PosteriorPicture]:
    """Exact (grid) posteriors of a 2-d latent model and the method's own `posterior_draws` for examples x."""
    model = module.model
    if model.latent_dim != 2:
        raise ConfigError(f"posterior pictures need a 2-d latent, the model has latent_dim={model.latent_dim}")
    exact = zoomed_posteriors(model, x, limit, resolution)
    draws = module.posterior_draws(x, index, n_draws, generator) if n_draws > 0 else None
    return [PosteriorPicture(d, e, None if draws is None else draws[:, i].detach().cpu())
            for i, (d, e) in enumerate(exact)]


def plot_posterior_pictures(path: str | Path, pictures: Sequence[PosteriorPicture], x: Tensor | None = None,
                            image_shape: Sequence[int] | None = None, title: str = "") -> Path:
    """One row per example: the data (if images), the exact p(z|x), the method's draws over the exact
    posterior's contours, all on the same axes so the two posteriors compare at a glance."""
    from matplotlib.figure import Figure
    import numpy as np

    show_x = x is not None and image_shape is not None
    ncols = 3 if show_x else 2
    fig = Figure(figsize=(3.2 * ncols, 3.0 * len(pictures)))
    axes = fig.subplots(len(pictures), ncols, squeeze=False)
    for row, pic in enumerate(pictures):
        density = pic.density.numpy()
        res = density.shape[0]
        x0, x1, y0, y1 = pic.extent
        gx, gy = np.linspace(x0, x1, res), np.linspace(y0, y1, res)
        if show_x:
            ax = axes[row, 0]
            ax.imshow(x[row].detach().cpu().reshape(*image_shape)[0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_axis_off()
            ax.set_title("x" if row else "data x")
        ax = axes[row, -2]
        ax.imshow(density, origin="lower", extent=pic.extent, cmap="viridis", interpolation="nearest", aspect="auto")
        ax.set_title("exact p(z|x) (grid)")
        ax = axes[row, -1]
        ax.contour(gx, gy, density, levels=5, colors="k", linewidths=0.6)
        if pic.draws is not None:
            d = pic.draws.numpy()
            ax.scatter(d[:, 0], d[:, 1], s=3, alpha=0.35, color="tab:red", edgecolors="none")
            ax.set_title("method draws (red), exact contours")
        else:
            ax.set_title("method has no posterior draws")
        for ax in axes[row, -2:]:
            ax.set_xlim(x0, x1)
            ax.set_ylim(y0, y1)
            ax.set_xlabel("z1")
            ax.set_ylabel("z2")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


__all__ = ["fitted_gaussian", "fitted_gaussian_elbo", "InferenceGap", "BDMCBounds", "GapSettings", "gap_terms",
           "inference_gap_metrics", "bdmc_metrics", "PosteriorPicture", "zoomed_posteriors", "posterior_pictures",
           "plot_posterior_pictures"]
