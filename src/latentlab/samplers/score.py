"""Langevin samplers driven by a score s(x, sigma) ~ grad log p_sigma(x), not by a log-density.

A denoiser gives scores and no densities (Tweedie: s = (D(x, sigma) - x) / sigma^2), so these
samplers take `score(x, sigma) -> (..., d)` where `latentlab.samplers.langevin` takes `log_prob`.
All three run the same move at a list of (level, step) pairs,

    x <- x + eta_j s_j(x) + sqrt(2 eta_j) N(0, I),      K steps per level,

and differ in the levels:

- `ScoreULA`: one small sigma (the reference's x + (eta / sigma^2)(D(x) - x) + sqrt(2 eta) z). Far from
  the data the score at a small sigma is tiny in effect (or, learned, wrong), so chains started there
  take very long to arrive and do not cross between modes: the "low-density region" failure.
- `ScoreAnnealedLangevin`: sigma_1 > ... > sigma_L with eta_j = step_size * sigma_j^2 / sigma_L^2
  (Song & Ermon 2019, Alg. 1): at large sigma the noised density covers the space and keeps the
  mode weights, so chains arrive in proportion and are refined level by level.
- `AlphaMixingLangevin`: the lecture's y = (1 - alpha) x + alpha v, alpha_0 (up to 1, pure noise)
  down to alpha_L; p_alpha(y) = (1 - alpha)^-n p_sigma(y / (1 - alpha)) with sigma = alpha / (1 - alpha),
  so its score (1 / alpha^2)((1 - alpha) D*(y, alpha) - y) comes from the same sigma-score; the chain
  stays in a bounded range the whole way (no sigma_1 * N(0, I) start needed).

`final_denoise=True` ends with one Tweedie step x <- x + sigma_L^2 s(x, sigma_L) = D(x, sigma_L), which
removes the last level's noise (Jolicoeur-Martineau et al. 2021). A `measurement(x, sigma)` term, the
gradient of log p(observation | x) at noise level sigma, is added to the score for inverse problems.
Every random number comes from the `generator`; works under `torch.no_grad()` (scores need no autograd).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from latentlab.errors import ConfigError, NumericalError
from latentlab.samplers.langevin import SamplerResult

ScoreFn = Callable[[Tensor, float], Tensor]
"""(x (..., d), sigma) -> grad_x log p_sigma(x), same shape as x."""

MeasurementFn = Callable[[Tensor, float], Tensor]
"""(x, sigma) -> grad_x log p(observation | x) at noise level sigma (an inverse problem's data term)."""


def geometric_levels(high: float, low: float, n: int) -> list[float]:
    """n levels from `high` down to `low`, equal ratios (n = 1: [low])."""
    if n < 1 or not high >= low > 0:
        raise ConfigError(f"noise levels need n_levels >= 1 and max >= min > 0, got n_levels={n}, max={high}, min={low}")
    if n == 1:
        return [float(low)]
    ratio = (low / high) ** (1.0 / (n - 1))
    return [float(high * ratio**i) for i in range(n - 1)] + [float(low)]


def _check_levels(levels: Sequence[float], what: str) -> list[float]:
    levels = [float(v) for v in levels]
    if not levels or levels[-1] <= 0 or any(a < b for a, b in zip(levels, levels[1:])):
        raise ConfigError(f"sampler.{what} must be positive and non-increasing, got {levels}")
    return levels


class ScoreSampler:
    """Shared loop: `schedule()` gives (level, eta) per level; subclasses map a level to a score.

    A subclass implements `schedule()` and, if its levels are not sigmas, `level_score` and
    `level_denoise`. It gets `sample(score, x0, generator, measurement, keep_samples)` and
    `n_score_calls` (what a fair comparison between samplers holds fixed).
    """

    def __init__(self, step_size: float, n_steps: int, final_denoise: bool = False) -> None:
        if not float(step_size) > 0:
            raise ConfigError(f"sampler.step_size must be > 0, got {step_size!r}")
        if isinstance(n_steps, bool) or int(n_steps) != n_steps or n_steps < 1:
            raise ConfigError(f"sampler.n_steps must be an integer >= 1, got {n_steps!r}")
        self.step_size, self.n_steps, self.final_denoise = float(step_size), int(n_steps), bool(final_denoise)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    def schedule(self) -> list[tuple[float, float]]:
        """(level, step size) for each level, in the order they are run."""
        raise NotImplementedError

    @property
    def n_score_calls(self) -> int:
        return len(self.schedule()) * self.n_steps + int(self.final_denoise)

    def level_score(self, score: ScoreFn, x: Tensor, level: float) -> Tensor:
        """grad log of the level's density at x; levels are sigmas here."""
        return score(x, level)

    def level_denoise(self, score: ScoreFn, x: Tensor, level: float) -> Tensor:
        """Tweedie's E[clean | x] at the level: x + sigma^2 s(x, sigma)."""
        return x + level**2 * score(x, level)

    @torch.no_grad()
    def sample(self, score: ScoreFn, x0: Tensor, generator: torch.Generator | None = None,
               measurement: MeasurementFn | None = None, keep_samples: bool = False) -> SamplerResult:
        """Run every level from x0 (..., d). `samples` (keep_samples): the state after each step of the
        last level, (n_steps, *x0.shape). Diagnostics: `n_score_calls`, `score_norm` (mean ||s||)."""
        full: ScoreFn = score if measurement is None else (lambda x, s: score(x, s) + measurement(x, s))
        x = x0.detach().clone()
        plan = self.schedule()
        kept = x.new_empty((self.n_steps, *x.shape)) if keep_samples else None
        norm, calls = x.new_zeros(()), 0
        for j, (level, eta) in enumerate(plan):
            noise_scale = (2.0 * eta) ** 0.5
            for k in range(self.n_steps):
                s = self.level_score(full, x, level)
                norm += torch.linalg.vector_norm(s, dim=-1).mean()
                calls += 1
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                x = x.add_(s, alpha=eta).add_(noise, alpha=noise_scale)
                if kept is not None and j == len(plan) - 1:
                    kept[k].copy_(x)
        if self.final_denoise:
            x = self.level_denoise(full, x, plan[-1][0])
            calls += 1
        if not bool(torch.isfinite(x).all()):
            raise NumericalError(f"{type(self).__name__} produced non-finite samples: lower sampler.step_size "
                                 f"(now {self.step_size}; stable below ~2 x the last level squared)")
        diagnostics: dict[str, float | Tensor] = {"n_score_calls": float(calls), "score_norm": float(norm) / max(calls, 1)}
        return SamplerResult(x, torch.full(x.shape[:-1], plan[-1][1], dtype=x.dtype, device=x.device), kept, diagnostics)


class ScoreULA(ScoreSampler):
    """`n_steps` unadjusted Langevin steps of size `step_size` at the single noise level `sigma`."""

    def __init__(self, step_size: float, n_steps: int, sigma: float = 0.01, final_denoise: bool = False) -> None:
        super().__init__(step_size, n_steps, final_denoise)
        if not float(sigma) > 0:
            raise ConfigError(f"sampler.sigma must be > 0, got {sigma!r}")
        self.sigma = float(sigma)

    def schedule(self) -> list[tuple[float, float]]:
        return [(self.sigma, self.step_size)]


class ScoreAnnealedLangevin(ScoreSampler):
    """Song & Ermon's annealed Langevin: levels geometric `sigma_max` -> `sigma_min` (or an explicit
    decreasing `levels`), `n_steps` each, eta_j = step_size * sigma_j^2 / sigma_L^2."""

    def __init__(self, step_size: float, n_steps: int, n_levels: int = 10, sigma_max: float = 1.0,
                 sigma_min: float = 0.01, levels: Sequence[float] | None = None, final_denoise: bool = False) -> None:
        super().__init__(step_size, n_steps, final_denoise)
        self.levels = _check_levels(levels if levels is not None else geometric_levels(sigma_max, sigma_min, n_levels),
                                    "levels")

    def schedule(self) -> list[tuple[float, float]]:
        last = self.levels[-1]
        return [(s, self.step_size * (s / last) ** 2) for s in self.levels]


class AlphaMixingLangevin(ScoreSampler):
    """The lecture's variant on y = (1 - alpha) x + alpha v: alphas geometric `alpha_max` -> `alpha_min`
    (or explicit `levels`, all in (0, 1]), eta_j = step_size * alpha_j^2 / alpha_L^2. At alpha = 1 the
    density is N(0, I) exactly (score -y); below it the sigma-score gives it (see module doc)."""

    def __init__(self, step_size: float, n_steps: int, n_levels: int = 10, alpha_max: float = 1.0,
                 alpha_min: float = 0.01, levels: Sequence[float] | None = None, final_denoise: bool = False) -> None:
        super().__init__(step_size, n_steps, final_denoise)
        levels = _check_levels(levels if levels is not None else geometric_levels(alpha_max, alpha_min, n_levels), "levels")
        if levels[0] > 1.0:
            raise ConfigError(f"sampler alphas must lie in (0, 1], got {levels}")
        self.levels = levels

    def schedule(self) -> list[tuple[float, float]]:
        last = self.levels[-1]
        return [(a, self.step_size * (a / last) ** 2) for a in self.levels]

    def level_score(self, score: ScoreFn, x: Tensor, level: float) -> Tensor:
        if level >= 1.0:
            return -x
        keep = 1.0 - level
        return score(x / keep, level / keep) / keep

    def level_denoise(self, score: ScoreFn, x: Tensor, level: float) -> Tensor:
        """E[x | y] = (y + alpha^2 grad log p_alpha(y)) / (1 - alpha)."""
        if level >= 1.0:
            return torch.zeros_like(x)
        return (x + level**2 * self.level_score(score, x, level)) / (1.0 - level)


__all__ = ["ScoreFn", "MeasurementFn", "ScoreSampler", "ScoreULA", "ScoreAnnealedLangevin", "AlphaMixingLangevin",
           "geometric_levels"]
