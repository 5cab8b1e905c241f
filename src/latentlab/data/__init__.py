"""LightningDataModules: every batch is `(x, index)`, x float32 (batch, data_dim), index int64 (batch,)."""

from latentlab.data.base import IndexedTensorDataset, LatentDataModule, SplitData
from latentlab.data.digits import DigitsDataModule
from latentlab.data.mnist import BinarizedMNISTDataModule, FashionMNISTDataModule, MNISTDataModule
from latentlab.data.ring import GaussianMixture, GaussianRingDataModule
from latentlab.data.toy import AVBToyDataModule, LinearGaussianDataModule, NormalMeansDataModule

__all__ = [
    "LatentDataModule",
    "SplitData",
    "IndexedTensorDataset",
    "DigitsDataModule",
    "MNISTDataModule",
    "FashionMNISTDataModule",
    "BinarizedMNISTDataModule",
    "AVBToyDataModule",
    "LinearGaussianDataModule",
    "NormalMeansDataModule",
    "GaussianRingDataModule",
    "GaussianMixture",
]
