"""LightningModules, one small file per inference method around the shared `GenerativeModel`."""

from latentlab.models.base import EvalSpec, LatentVariableModel, LikelihoodSpec
from latentlab.models.vae import VAE

METHODS: dict[str, type[LatentVariableModel]] = {"vae": VAE}

__all__ = ["LatentVariableModel", "LikelihoodSpec", "EvalSpec", "VAE", "METHODS"]
