"""Score-driven Langevin samplers on the ring's exact score: mode coverage and weights (Song & Ermon 2019, Fig. 3)."""

from __future__ import annotations

from importlib.resources import files

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from latentlab.data.ring import GaussianMixture, ring_mixture
from latentlab.errors import ConfigError
from latentlab.samplers.score import AlphaMixingLangevin, ScoreAnnealedLangevin, ScoreSampler, ScoreULA

RADIUS = 0.4  # 4 stds of a mode; modes are 1.53 apart, so "at mode k" is unambiguous


def mode_fractions(mix: GaussianMixture, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(fraction of samples at each mode, fraction at none)."""
    nearest = mix.nearest_mode(x, RADIUS)
    counts = torch.bincount(nearest[nearest >= 0], minlength=mix.means.shape[0]).double()
    return counts / len(x), float((nearest < 0).double().mean())


def run(sampler: ScoreSampler, mix: GaussianMixture, n: int = 2000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 2, generator=g, dtype=torch.float64)  # the same N(0, I) start for every sampler
    return sampler.sample(lambda x, s: mix.score(x, s), x0, g).z


@pytest.mark.parametrize("sampler", [
    ScoreAnnealedLangevin(step_size=8e-5, n_steps=50, n_levels=10, sigma_max=3.0, sigma_min=0.01),
    AlphaMixingLangevin(step_size=8e-5, n_steps=50, n_levels=10, alpha_max=1.0, alpha_min=0.01, final_denoise=True),
], ids=["annealed", "alpha"])
def test_annealed_langevin_covers_every_ring_mode_with_weight_one_eighth(sampler: ScoreSampler) -> None:
    """2000 chains, 10 levels x 50 steps: measured weights 0.119-0.130 with no chain off-mode."""
    fractions, off = mode_fractions(ring_mixture(), run(sampler, ring_mixture()))
    assert off <= 0.05
    assert (fractions - 1 / 8).abs().max() <= 0.04, fractions


def test_single_sigma_ula_with_as_many_score_calls_misses_the_mode_weights() -> None:
    """One mode 3x heavier (weight 0.3): annealing carries chains across at large sigma, so they land in
    proportion (measured 0.28); ULA at sigma_min only rolls down to the nearest mode of its N(0, I) start,
    so every mode gets ~1/8 whatever its weight (measured 0.126), at the same 1000 score calls and even
    with a step 60x larger than the annealed one's last (at the edge of stability, 2 sigma^2 ~ 2e-2)."""
    mix = ring_mixture(weights=[3, 1, 1, 1, 1, 1, 1, 1])
    annealed = ScoreAnnealedLangevin(step_size=4e-5, n_steps=100, n_levels=10, sigma_max=2.0, sigma_min=0.01)
    fractions, off = mode_fractions(mix, run(annealed, mix))
    assert off <= 0.05 and abs(float(fractions[0]) - 0.3) <= 0.05, fractions
    assert (fractions[1:] - 0.1).abs().max() <= 0.04
    for step in (4e-5, 2.5e-3):
        ula = ScoreULA(step_size=step, n_steps=annealed.n_score_calls, sigma=0.01)
        assert ula.n_score_calls == annealed.n_score_calls
        fractions, off = mode_fractions(mix, run(ula, mix))
        assert float(fractions[0]) < 0.18, f"ULA step {step}: heavy mode got {float(fractions[0]):.3f} (truth 0.3)"


def test_final_denoise_step_is_tweedie_and_measurement_term_is_added() -> None:
    """final_denoise ends at D(x, sigma_L) (one more score call); a measurement pulling to a point moves chains there."""
    mix = ring_mixture()
    plain = ScoreULA(step_size=1e-5, n_steps=1, sigma=0.5)
    denoised = ScoreULA(step_size=1e-5, n_steps=1, sigma=0.5, final_denoise=True)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(100, 2, generator=g, dtype=torch.float64)
    x1 = plain.sample(lambda x, s: mix.score(x, s), x0, torch.Generator().manual_seed(4)).z
    x2 = denoised.sample(lambda x, s: mix.score(x, s), x0, torch.Generator().manual_seed(4))
    assert x2.diagnostics["n_score_calls"] == 2.0
    assert torch.allclose(x2.z, mix.posterior_mean(x1, 0.5), atol=1e-12)
    # a zero prior score plus the measurement (target - x) / v: the chains' law is N(target, v I)
    # (up to ULA's O(eta) inflation, 1 / (1 - eta / (2 v)) = 1.05 here)
    target = torch.tensor([5.0, 5.0], dtype=torch.float64)
    pulled = ScoreULA(step_size=1e-3, n_steps=300, sigma=0.1).sample(
        lambda x, s: torch.zeros_like(x), x0, g, measurement=lambda x, s: (target - x) / 0.01).z
    assert (pulled.mean(0) - target).abs().max() < 0.03
    assert pulled.var(0).div(0.0105).sub(1).abs().max() < 0.3

@pytest.mark.parametrize("name", ["score_ula", "score_annealed", "score_alpha"])
def test_sampler_presets_build(name: str) -> None:
    node = OmegaConf.load(str(files("latentlab.conf").joinpath("sampler", f"{name}.yaml")))
    sampler = instantiate(node)
    assert isinstance(sampler, ScoreSampler) and sampler.n_score_calls == 501


def test_bad_sampler_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="step_size"):
        ScoreULA(step_size=0.0, n_steps=10)
    with pytest.raises(ConfigError, match="non-increasing"):
        ScoreAnnealedLangevin(step_size=1e-3, n_steps=1, levels=[0.1, 1.0])
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        AlphaMixingLangevin(step_size=1e-3, n_steps=1, levels=[2.0, 0.5])


def test_a_diverging_step_is_a_numerical_error_naming_the_fix() -> None:
    from latentlab.errors import NumericalError

    mix = ring_mixture()
    with pytest.raises(NumericalError, match="lower sampler.step_size"):
        ScoreULA(step_size=1.0, n_steps=200, sigma=0.01).sample(lambda x, s: mix.score(x, s),
                                                                 torch.randn(10, 2, dtype=torch.float64))
