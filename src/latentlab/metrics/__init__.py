"""Evaluation metrics, all usable from Lightning test steps and from `latentlab-eval`.

- log-likelihood estimators (IS, AIS, BDMC) and the NLL metric (`loglik`);
- the inference-gap decomposition (`gaps`) and posterior-quality diagnostics + 2-d pictures (`posterior`);
- sample quality in a per-dataset classifier's feature space: FID, KID, IS, precision/recall
  (`quality`, classifiers in `classifier`).
"""

from latentlab.metrics.classifier import DomainClassifier, load_idx_splits, load_or_train_classifier, train_classifier
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
from latentlab.metrics.posterior import (
    BDMCBounds,
    GapSettings,
    InferenceGap,
    bdmc_metrics,
    fitted_gaussian,
    fitted_gaussian_elbo,
    inference_gap_metrics,
    plot_posterior_pictures,
    posterior_pictures,
)
from latentlab.metrics.quality import (
    ClassifierFID,
    ClassifierIS,
    ClassifierKID,
    PrecisionRecall,
    SampleQuality,
    sample_quality,
)

__all__ = [
    "AnnealedImportanceSampling",
    "BDMCBounds",
    "BDMCResult",
    "ClassifierFID",
    "ClassifierIS",
    "ClassifierKID",
    "DomainClassifier",
    "GapSettings",
    "ImportanceSampling",
    "InferenceGap",
    "LogLikelihood",
    "PrecisionRecall",
    "SampleQuality",
    "ais_log_likelihood",
    "annealing_schedule",
    "bdmc",
    "bdmc_metrics",
    "fit_gaussian_proposal",
    "fit_local_gaussian",
    "fitted_gaussian",
    "fitted_gaussian_elbo",
    "gaussian_elbo",
    "gaussian_log_weights",
    "importance_sampling_log_likelihood",
    "inference_gap_metrics",
    "inference_gaps",
    "load_idx_splits",
    "load_or_train_classifier",
    "log_mean_exp",
    "mean_and_se",
    "plot_posterior_pictures",
    "posterior_pictures",
    "sample_proposal",
    "sample_quality",
    "simulator_from_model",
    "standard_normal",
    "train_classifier",
]
