"""Evaluation metrics. Log-likelihood estimators (IS, AIS, BDMC), the NLL metric and the
inference-gap decomposition are exported here; sample-quality metrics live in `quality`."""

from latentlab.metrics.gaps import fit_local_gaussian, gaussian_elbo, gaussian_log_weights, inference_gaps
from latentlab.metrics.loglik import (
    AnnealedImportanceSampling,
    BDMCResult,
    ImportanceSampling,
    LogLikelihood,
    ais_log_likelihood,
    annealing_schedule,
    bdmc,
    fit_gaussian_proposal,
    importance_sampling_log_likelihood,
    log_mean_exp,
    mean_and_se,
    sample_proposal,
    simulator_from_model,
    standard_normal,
)

__all__ = [
    "AnnealedImportanceSampling",
    "BDMCResult",
    "ImportanceSampling",
    "LogLikelihood",
    "ais_log_likelihood",
    "annealing_schedule",
    "bdmc",
    "fit_gaussian_proposal",
    "fit_local_gaussian",
    "gaussian_elbo",
    "gaussian_log_weights",
    "importance_sampling_log_likelihood",
    "inference_gaps",
    "log_mean_exp",
    "mean_and_se",
    "sample_proposal",
    "simulator_from_model",
    "standard_normal",
]
