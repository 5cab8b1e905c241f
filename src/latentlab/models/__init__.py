"""LightningModules, one small file per inference method around the shared `GenerativeModel`."""

from latentlab.models.base import LatentVariableModel, LikelihoodSpec
from latentlab.models.vae import VAE
from latentlab.models.avb import AVB
from latentlab.models.almond import ALMOND
from latentlab.models.denoiser import Denoiser

#: checkpoint method name -> class (the denoiser is no LatentVariableModel: no p(z), no log p(x))
METHODS: dict[str, type] = {"vae": VAE, "avb": AVB, "almond": ALMOND, "denoiser": Denoiser}

__all__ = ["LatentVariableModel", "LikelihoodSpec", "VAE", "AVB", "ALMOND", "Denoiser", "METHODS"]
