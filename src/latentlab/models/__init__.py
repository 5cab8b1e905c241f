"""LightningModules, one small file per inference method around the shared `GenerativeModel`."""

from latentlab.models.base import EvalSpec, LatentVariableModel, LikelihoodSpec
from latentlab.models.vae import VAE
from latentlab.models.avb import AVB
from latentlab.models.almond import ALMOND

METHODS: dict[str, type[LatentVariableModel]] = {"vae": VAE, "avb": AVB, "almond": ALMOND}

__all__ = ["LatentVariableModel", "LikelihoodSpec", "EvalSpec", "VAE", "AVB", "ALMOND", "METHODS"]
