"""Annealed Langevin: ULA through a decreasing ladder of temperatures or noise levels (Song & Ermon 2019), for
chains that start far from (or between) posterior modes; and `sampler_preset`, the packaged conf/sampler/ presets.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files

import torch
import yaml
from torch import Tensor

from latentlab.errors import ConfigError
from latentlab.samplers.langevin import MALA, ULA, LangevinSampler, LogProb, NoiseLogProb, SamplerResult, _Recorder, _Step


class AnnealedLangevin(LangevinSampler):
    """ULA through a decreasing ladder of levels, `n_steps` steps at each (Song & Ermon 2019, Alg. 1).

    Step at level i: s_i = step_size * l_i / l_L (with l = sigma^2 for noise levels, l = T for
    temperatures), so that s_i times the target's curvature stays roughly constant along the ladder.

    mode="temper" (any `log_prob`, e.g. ALMOND's posterior): level i targets p(z)^(1 / T_i); the
    ladder should end at T_L = 1. Chains cross barriers at high T, but p^(1/T) changes the relative
    weight of separated modes (ratio (w1/w2)^(1/T) at equal widths), so the chains' mode proportions
    are biased toward uniform; `diagnostics["log_weights"]` holds annealed-importance-sampling log
    weights (Neal 2001) sum_i (1/T_{i+1} - 1/T_i) log p(z_i) that correct it (up to ULA bias).
    mode="noise": `log_prob(z, sigma)` is the log-density of the target convolved with N(0, sigma^2 I),
    which keeps mode weights at every level, so the chains themselves land with the right weights.

    Levels: geometric from `max_level` to `min_level` in `n_levels` steps, or an explicit decreasing
    `levels`. `burn_in`/`thin`/kept samples refer to the last level's steps.
    """

    def __init__(
        self,
        step_size: float | Tensor,
        n_steps: int,
        n_levels: int = 10,
        max_level: float = 10.0,
        min_level: float = 1.0,
        levels: Sequence[float] | None = None,
        mode: str = "temper",
        burn_in: int = 0,
        thin: int = 1,
        guard: bool = False,
    ) -> None:
        super().__init__(step_size, n_steps, burn_in, thin, guard)
        if mode not in ("temper", "noise"):
            raise ValueError(f"mode must be 'temper' or 'noise', got {mode!r}")
        if levels is None:
            if n_levels < 1 or not max_level >= min_level > 0:
                raise ValueError("need n_levels >= 1 and max_level >= min_level > 0")
            ratio = (min_level / max_level) ** (1.0 / max(n_levels - 1, 1))
            levels = [max_level * ratio**i for i in range(n_levels - 1)] + [min_level]
        levels = [float(v) for v in levels]
        if not levels or levels[-1] <= 0 or any(a < b for a, b in zip(levels, levels[1:])):
            raise ValueError(f"levels must be positive and non-increasing, got {levels}")
        self.levels = levels
        self.mode = mode

    def step_multipliers(self) -> list[float]:
        """s_i / step_size for each level: sigma_i^2 / sigma_L^2 or T_i / T_L."""
        last = self.levels[-1]
        power = 2 if self.mode == "noise" else 1
        return [(v / last) ** power for v in self.levels]

    def _plan(self, log_prob: LogProb | NoiseLogProb) -> list[_Step]:
        plan: list[_Step] = []
        for i, (level, multiplier) in enumerate(zip(self.levels, self.step_multipliers())):
            if self.mode == "noise":
                target: LogProb = lambda z, f=log_prob, sigma=level: f(z, sigma)  # noqa: E731
                coef = 0.0
            else:
                target = lambda z, f=log_prob, temperature=level: f(z) / temperature  # noqa: E731
                # AIS increment (1/T_i - 1/T_{i-1}) log p at the first state of level i, from the
                # tempered value log p / T_i that this step computes anyway.
                coef = 1.0 - level / self.levels[i - 1] if i else 0.0
            plan.extend(_Step(target, multiplier, coef if k == 0 else 0.0) for k in range(self.n_steps))
        return plan

    @torch.no_grad()
    def sample(
        self,
        log_prob: LogProb | NoiseLogProb,
        z0: Tensor,
        generator: torch.Generator | None = None,
        keep_samples: bool = False,
        step_size: float | Tensor | None = None,
        step_count: Tensor | None = None,
    ) -> SamplerResult:
        """Anneal from z0 (..., d) through all levels; `step_size` (the last level's) overrides the constructor's.

        Diagnostics: `grad_norm`, `n_nonfinite`, `nonfinite_per_chain`, and in temper mode
        `log_weights` (shape z.shape[:-1]).
        """
        z = z0.detach()
        step = self._initial_step(z, step_size)
        recorder = _Recorder(self.n_steps, self.burn_in, self.thin, z, keep_samples)
        plan = self._plan(log_prob)
        z, step, diagnostics = self._run_unadjusted(plan, z, step, generator, recorder, len(plan) - self.n_steps)
        return SamplerResult(z, step, recorder.samples, diagnostics, self._counts(z, step_count) + len(plan))


def sampler_preset(name: str) -> LangevinSampler:
    """The packaged conf/sampler/<name>.yaml (ula | mala | annealed) as a sampler: the one place its defaults live,
    for code that runs without Hydra (a bare ALMOND(...), a notebook)."""
    classes = {"ULA": ULA, "MALA": MALA, "AnnealedLangevin": AnnealedLangevin}
    source = files("latentlab.conf").joinpath("sampler", f"{name}.yaml")
    data = yaml.safe_load(source.read_text()) if source.is_file() else {}
    target = str(data.pop("_target_", "")).rsplit(".", 1)[-1]
    if target not in classes:
        raise ConfigError(f"unknown Langevin sampler {name!r}; choose sampler=ula|mala|annealed")
    return classes[target](**data)
