"""latentlab: one generative model class, three ways to infer its posterior, one evaluator."""

from latentlab.generative import GenerativeModel, StandardNormalPrior
from latentlab.likelihoods import BernoulliLikelihood, GaussianLikelihood, Likelihood

__all__ = [
    "GenerativeModel",
    "StandardNormalPrior",
    "Likelihood",
    "BernoulliLikelihood",
    "GaussianLikelihood",
]
__version__ = "0.1.0"
