"""The estimator layer: log p(x) (importance sampling, AIS), BDMC and the inference gaps.

Every function takes a `GenerativeModel`, a `latentlab.posterior.Posterior` (or plain tensors) and a settings
object; nothing here imports a method (latentlab.models), Lightning or Hydra (tests/test_estimators.py checks).
`estimate_log_px` is the one protocol behind `test/nll`; `conf/eval/nll/{fast,standard,paper}.yaml` are its budgets.
"""

from latentlab.estimators.ais import AnnealedImportanceSampling, ais_from_settings, ais_log_weights, ais_start, annealing_schedule
from latentlab.estimators.bdmc import BDMCResult, bdmc, simulator_from_model
from latentlab.estimators.common import (diagonal_gaussian, log_mean_exp, mean_and_se, sample_distribution,
                                         standard_normal, weight_stats)
from latentlab.estimators.gaps import LocalGaussian, fit_local_gaussian, gaussian_log_weights, inference_gaps
from latentlab.estimators.importance import ISResult, importance_sampling, importance_sampling_log_px
from latentlab.estimators.protocol import CONVERGENCE_FLAG_NATS, LogPxEstimate, estimate_log_px
from latentlab.estimators.settings import GapSettings, NLLSettings
from latentlab.posterior import gaussian_elbo, moment_fit

__all__ = [
    "AnnealedImportanceSampling", "BDMCResult", "CONVERGENCE_FLAG_NATS", "GapSettings", "ISResult", "LocalGaussian",
    "LogPxEstimate", "NLLSettings", "ais_from_settings", "ais_log_weights", "ais_start", "annealing_schedule", "bdmc",
    "diagonal_gaussian", "estimate_log_px", "fit_local_gaussian", "gaussian_elbo", "gaussian_log_weights",
    "importance_sampling", "importance_sampling_log_px", "inference_gaps", "log_mean_exp", "mean_and_se", "moment_fit",
    "sample_distribution", "simulator_from_model", "standard_normal", "weight_stats",
]
