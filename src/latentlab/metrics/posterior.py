"""Posterior quality, judged the same way for every method (VAE, AVB, ALMOND, ...), through the posterior
contract alone: `module.posterior(x, index)` and `module.model` (the GenerativeModel).

- The inference gap (Cremer, Li & Duvenaud 2018): log p(x) (AIS, the protocol's start) minus the posterior's
  own `bound(k)`. Posteriors with an amortized Gaussian (`gaussian()`) also get its split into the
  approximation gap (the best per-example Gaussian, optimised to convergence, is still below log p(x)) and the
  amortization gap; examples whose optimisation did not converge are counted (`gap_local_not_converged`).
- BDMC (Grosse et al. 2015) on data simulated from the model: sandwich bounds whose gap says how far to trust AIS.
- For 2-d latents: exact posteriors (quadrature on a grid) beside the method's posterior draws.

The accumulators are `MeanAndSE` Metrics (sum-reduced).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import torch
from torch import Tensor

from latentlab.errors import ConfigError
from latentlab.estimators import (AnnealedImportanceSampling, GapSettings, NLLSettings, ais_start, bdmc,
                                  estimate_log_px, fit_local_gaussian)
from latentlab.estimators.gaps import per_example_gaps
from latentlab.generative import GenerativeModel
from latentlab.metrics.grid import grid_log_joint, latent_grid
from latentlab.metrics.loglik import MeanAndSE
from latentlab.posterior import Posterior
from latentlab.progress import progress

Batch = tuple[Tensor, Tensor]


class MethodLike(Protocol):
    """What the analyses need of a method: its generative model and its posterior."""

    model: GenerativeModel

    def posterior(self, x: Tensor, index: Tensor | None = None) -> Posterior: ...


# --------------------------------------------------------------------------- metrics

_GAP_QUANTITIES = ("log_px", "elbo", "elbo_local", "inference_gap", "approximation_gap", "amortization_gap",
                   "local_converged")
# per-example quantities -> report keys (ALMOND's bound is not amortized, so no "amortized" in the key)
_GAP_NAMES = {"log_px": "gap_log_px", "elbo": "gap_elbo", "elbo_local": "gap_elbo_local"}


class InferenceGap(MeanAndSE):
    """Per-example log p(x), the method's bound and (optionally) the best local Gaussian's ELBO -> means +/-
    standard errors of `inference_gap` and, with `elbo_local`, `approximation_gap` + `amortization_gap`."""

    higher_is_better = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(_GAP_QUANTITIES, **kwargs)

    def update(self, log_px: Tensor, elbo: Tensor, elbo_local: Tensor | None = None,  # type: ignore[override]
               converged: Tensor | None = None) -> None:
        values = per_example_gaps(log_px, elbo, elbo_local, caller="InferenceGap.update")
        if elbo_local is not None:
            values["local_converged"] = (converged if converged is not None else torch.ones_like(log_px)).double()
        super().update(**{k: v.double() for k, v in values.items()})

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        if self.count_of("elbo_local") not in (0, self.count_of("log_px")):
            raise ConfigError("InferenceGap got elbo_local for some batches only")
        stats = super().compute()
        out: dict[str, float] = {}
        for key, value in stats.items():
            name, se = (key[:-3], "_se") if key.endswith("_se") else (key, "")
            if name != "local_converged":
                out[_GAP_NAMES.get(name, name) + se] = value
        if "local_converged" in stats:
            n = self.count_of("local_converged")
            out["gap_local_not_converged"] = float(round(n * (1.0 - stats["local_converged"])))
        return out


class BDMCBounds(MeanAndSE):
    """Per-example BDMC bounds on simulated data: `bdmc_lower` (forward AIS), `bdmc_upper` (reverse AIS from the
    exact posterior sample) and `bdmc_gap` = upper - lower, each with a standard error over examples."""

    higher_is_better = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(("bdmc_lower", "bdmc_upper", "bdmc_gap"), **kwargs)

    def update(self, lower: Tensor, upper: Tensor) -> None:  # type: ignore[override]
        lower, upper = lower.detach().double().reshape(-1), upper.detach().double().reshape(-1)
        super().update(bdmc_lower=lower, bdmc_upper=upper, bdmc_gap=upper - lower)


# --------------------------------------------------------------------------- inference gap


def gap_terms(module: MethodLike, x: Tensor, index: Tensor | None, settings: GapSettings, nll: NLLSettings,
              generator: torch.Generator | None = None) -> dict[str, Tensor] | None:
    """Per-example `log_px` (AIS by `nll`'s budget and start), `elbo` (the posterior's own bound) and, for amortized
    Gaussians, `elbo_local` and `converged` of the best per-example Gaussian; None if the method has no bound."""
    # examples per bound call such that k x examples x data_dim stays under max_elements: a method may draw all
    # k samples at once (AVB's discriminator estimate does)
    step = max(1, settings.max_elements // (settings.elbo_k * max(1, x[0].numel())))
    parts = []
    with torch.no_grad():
        for i in range(0, x.shape[0], step):
            part = module.posterior(x[i: i + step], None if index is None else index[i: i + step])
            parts.append(part.bound(settings.elbo_k, generator))
    if any(p is None for p in parts):
        return None
    posterior = module.posterior(x, index)
    log_px = estimate_log_px(module.model, x, posterior, replace(nll, estimator="ais"), generator).log_px
    out = {"log_px": log_px.detach(), "elbo": torch.cat(parts).detach()}
    gaussian = posterior.gaussian()
    if gaussian is not None:
        fit = fit_local_gaussian(module.model.log_joint, x, *(g.detach() for g in gaussian), generator=generator,
                                 settings=settings)
        out["elbo_local"], out["converged"] = fit.elbo, fit.converged
    return out


def inference_gap_metrics(module: MethodLike, batches: Iterable[Batch], settings: GapSettings | None = None,
                          nll: NLLSettings | None = None, generator: torch.Generator | None = None,
                          metric: InferenceGap | None = None, total: int | None = None) -> dict[str, float] | None:
    """Run `gap_terms` over `batches` of (x, index) and reduce them; None if the method has no bound.
    `total` (examples) sizes the progress bar."""
    settings, nll = settings or GapSettings(), nll or NLLSettings.preset("standard")
    metric = metric if metric is not None else InferenceGap()
    with progress("inference gaps", total, "examples") as advance:
        for x, index in batches:
            terms = gap_terms(module, x, index, settings, nll, generator)
            if terms is None:
                return None
            metric.update(terms["log_px"], terms["elbo"], terms.get("elbo_local"), terms.get("converged"))
            advance(x.shape[0])
    return metric.compute()


# --------------------------------------------------------------------------- BDMC


def bdmc_metrics(module: MethodLike, n_examples: int, ais: AnnealedImportanceSampling, batch_size: int = 100,
                 generator: torch.Generator | None = None, nll: NLLSettings | None = None) -> dict[str, float]:
    """BDMC on `n_examples` pairs (x, z) simulated from the module's generative model, `batch_size` at a time.

    `ais` should have the budget behind the reported log p(x): its gap then bounds that estimate's error on data
    like these (1 chain here and K there: a conservative bound). q0 is the protocol's start for `nll` (default
    `standard`: the Gaussian fitted to the method's posterior), the same start the test-set AIS uses.
    """
    if n_examples < 1 or batch_size < 1:
        raise ConfigError(f"BDMC needs n_examples >= 1 and batch_size >= 1, got {n_examples}, {batch_size}")
    model, nll = module.model, nll or NLLSettings.preset("standard")
    metric = BDMCBounds()
    with progress("BDMC", n_examples, "simulated examples") as advance:
        for start in range(0, n_examples, batch_size):
            n = min(batch_size, n_examples - start)
            result = bdmc(model.log_joint, model, n, ais=ais,
                          init=lambda x: ais_start(model, x, module.posterior(x, None), nll, generator),
                          latent_dim=model.latent_dim, generator=generator)
            metric.update(result.log_px_lower, result.log_px_upper)
            advance(n)
    return metric.compute()


# --------------------------------------------------------------------------- 2-d pictures


@dataclass
class PosteriorPicture:
    """One example's exact posterior on a grid zoomed to where its mass is, and the method's draws."""

    density: Tensor          # (resolution, resolution) cell probabilities, indexed [y, x]
    extent: tuple[float, float, float, float]
    draws: Tensor | None     # (n, 2) or None


@torch.no_grad()
def zoomed_posteriors(model: GenerativeModel, x: Tensor, limit: float = 6.0, resolution: int = 121,
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


def posterior_pictures(module: MethodLike, x: Tensor, index: Tensor | None, n_draws: int = 500, limit: float = 6.0,
                       resolution: int = 121, generator: torch.Generator | None = None) -> list[PosteriorPicture]:
    """Exact (grid) posteriors of a 2-d latent model and draws of the method's `posterior(x, index)`."""
    model = module.model
    if model.latent_dim != 2:
        raise ConfigError(f"posterior pictures need a 2-d latent, the model has latent_dim={model.latent_dim}")
    exact = zoomed_posteriors(model, x, limit, resolution)
    draws = module.posterior(x, index).sample(n_draws, generator).detach() if n_draws > 0 else None
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


__all__ = ["BDMCBounds", "InferenceGap", "MethodLike", "PosteriorPicture", "bdmc_metrics", "gap_terms",
           "inference_gap_metrics", "plot_posterior_pictures", "posterior_pictures", "zoomed_posteriors"]
