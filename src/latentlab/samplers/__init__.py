"""Langevin samplers (ALMOND's E-step) and MCMC diagnostics.

`ULA`, `MALA` and `AnnealedLangevin` share one call, `sample(log_prob, z0, generator, keep_samples,
step_size) -> SamplerResult`, so a config (`conf/sampler/*.yaml`) can swap them. HMC for AIS lives in
`latentlab.samplers.hmc` and is imported from there.
"""

from latentlab.samplers.diagnostics import effective_sample_size, rhat
from latentlab.samplers.annealed import AnnealedLangevin, sampler_preset
from latentlab.samplers.langevin import (
    MALA,
    ULA,
    LangevinSampler,
    LogProb,
    NoiseLogProb,
    SamplerResult,
    value_and_grad,
)

__all__ = [
    "ULA",
    "MALA",
    "AnnealedLangevin",
    "LangevinSampler",
    "SamplerResult",
    "LogProb",
    "NoiseLogProb",
    "value_and_grad",
    "sampler_preset",
    "rhat",
    "effective_sample_size",
]
