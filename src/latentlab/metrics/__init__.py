"""Evaluation metrics: torchmetrics wrappers of the estimators (`latentlab.estimators`) and sample quality.

- `loglik`: `MeanAndSE`, the one sum-reduced mean +/- standard error Metric, and `LogLikelihood` (test/nll);
- `posterior`: the inference-gap and BDMC analyses and the 2-d posterior pictures, through `posterior(x, index)`;
- `grid`: exact log p(x) and p(z|x) by quadrature for 2-d latents;
- `quality`: FID, KID, IS, precision/recall in a per-dataset classifier's feature space (`classifier`).
"""

from latentlab.metrics.classifier import DomainClassifier, load_idx_splits, load_or_train_classifier, train_classifier
from latentlab.metrics.loglik import LogLikelihood, MeanAndSE
from latentlab.metrics.posterior import (
    BDMCBounds,
    InferenceGap,
    bdmc_metrics,
    gap_terms,
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
    "BDMCBounds", "ClassifierFID", "ClassifierIS", "ClassifierKID", "DomainClassifier", "InferenceGap", "LogLikelihood",
    "MeanAndSE", "PrecisionRecall", "SampleQuality", "bdmc_metrics", "gap_terms", "inference_gap_metrics",
    "load_idx_splits", "load_or_train_classifier", "plot_posterior_pictures", "posterior_pictures", "sample_quality",
    "train_classifier",
]
