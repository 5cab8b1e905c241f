"""Synthetic datasets with known answers, as data modules (no files).

- `AVBToyDataModule`: the AVB paper's 4 one-hot points (a posterior that must split 4 ways).
- `LinearGaussianDataModule`: PPCA data, whose maximum log-likelihood is known in closed form.
- `NormalMeansDataModule`: ALMOND's "many normal means" simulation, with the true means kept.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor
from torch.distributions import Categorical, Distribution, Exponential, MixtureSameFamily, Normal

from latentlab.analytic import LinearGaussian
from latentlab.data.base import LatentDataModule, SplitData, check_int
from latentlab.rng import Stream, keyed_generator, seeded_global_rng
from latentlab.errors import ConfigError


def _check_sizes(num_train: int, num_val: int, num_test: int) -> None:
    check_int("num_train", num_train, 1)
    check_int("num_val", num_val, 0)
    check_int("num_test", num_test, 0)


def _split_rows(data: SplitData, sizes: tuple[int, int, int]) -> dict[str, SplitData]:
    """Consecutive train/val/test blocks of one synthetic draw."""
    bounds = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
    return {name: data.select(slice(bounds[i], bounds[i + 1])) for i, name in enumerate(("train", "val", "test"))}


class AVBToyDataModule(LatentDataModule):
    """Mescheder et al. (2017), the toy example: four data points, the one-hot vectors of R^4.

    Example i is one-hot(i mod 4) with label i mod 4, so an epoch of `num_train` examples holds the
    4 points equally often and shuffled batches are uniform draws, as in the paper's notebook
    (batch 512). Val and test hold each point once by default: their mean NLL is then the exact
    expectation under the data distribution (log 4 for a perfect model).
    """

    name = "avb_toy"

    def __init__(
        self,
        num_train: int = 4096,
        num_val: int = 4,
        num_test: int = 4,
        batch_size: int = 512,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        pin_memory: bool = False,
    ) -> None:
        _check_sizes(num_train=num_train, num_val=num_val, num_test=num_test)
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         shuffle=shuffle, pin_memory=pin_memory)
        self.sizes = (num_train, num_val, num_test)

    @property
    def data_dim(self) -> int:
        return 4

    def _load_splits(self) -> dict[str, SplitData]:
        splits = {}
        for name, n in zip(("train", "val", "test"), self.sizes):
            labels = torch.arange(n) % 4
            splits[name] = SplitData(torch.nn.functional.one_hot(labels, 4).float(), labels=labels)
        return splits


class LinearGaussianDataModule(LatentDataModule):
    """Data from a random linear-Gaussian model (probabilistic PCA), with its true latents.

    `true_model` is `LinearGaussian.random(data_dim, latent_dim, noise_var)` drawn with `data_seed`;
    checks compare fitted models with `latentlab.analytic.ppca_max_log_likelihood(dm.data("train"),
    latent_dim)` and with `true_model.log_marginal`.
    """

    name = "linear_gaussian"
    binarizable = False

    def __init__(
        self,
        data_dim: int = 8,
        latent_dim: int = 2,
        noise_var: float = 0.5,
        num_train: int = 2000,
        num_val: int = 500,
        num_test: int = 500,
        data_seed: int = 0,
        batch_size: int = 100,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        pin_memory: bool = False,
    ) -> None:
        _check_sizes(num_train=num_train, num_val=num_val, num_test=num_test)
        check_int("data_dim", data_dim, 1)
        check_int("latent_dim", latent_dim, 1)
        check_int("data_seed", data_seed, 0)
        if not noise_var > 0:
            raise ConfigError(f"data.noise_var must be > 0, got {noise_var!r}")
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         shuffle=shuffle, pin_memory=pin_memory)
        self.sizes = (num_train, num_val, num_test)
        self.data_seed = data_seed
        model_generator = keyed_generator(data_seed, Stream.SYNTHETIC_DATA, 0)
        self.true_model = LinearGaussian.random(data_dim, latent_dim, noise_var, generator=model_generator)

    @property
    def data_dim(self) -> int:
        return self.true_model.data_dim

    def _load_splits(self) -> dict[str, SplitData]:
        draws = keyed_generator(self.data_seed, Stream.SYNTHETIC_DATA, 1)
        x, z = self.true_model.sample(sum(self.sizes), generator=draws)
        return _split_rows(SplitData(x, latents=z), self.sizes)


class NormalMeansDataModule(LatentDataModule):
    """ALMOND's "many normal means" (Qiu & Wang 2020): x_i = mu_i + N(0, 1), mu_i ~ pi.

    The priors pi are those of the paper's experiments (yixuan/almond, experiments/many-normal-means):
    "normal" N(2, 0.5), "exponential" with scale 2, "mixture" 0.4 N(0, 0.5^2) + 0.6 N(3, 0.5^2);
    n = 1000 with full-batch updates and seed 123. ALMOND learns pi as the push-forward of N(0, 1)
    through the decoder, so the true means mu_i (`true_latents`, the paper's u_i) are the ground
    truth of the posterior means, and `log_marginal` gives the exact log p(x) under the true pi.
    """

    name = "normal_means"
    binarizable = False
    PRIORS: ClassVar[tuple[str, ...]] = ("normal", "exponential", "mixture")

    def __init__(
        self,
        prior: str = "normal",
        num_train: int = 1000,
        num_val: int = 0,
        num_test: int = 1000,
        data_seed: int = 123,
        batch_size: int = 1000,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        pin_memory: bool = False,
    ) -> None:
        if prior not in self.PRIORS:
            raise ConfigError(f"data.prior must be one of {list(self.PRIORS)}, got {prior!r}")
        _check_sizes(num_train=num_train, num_val=num_val, num_test=num_test)
        check_int("data_seed", data_seed, 0)
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         shuffle=shuffle, pin_memory=pin_memory)
        self.prior = prior
        self.data_seed = data_seed
        self.sizes = (num_train, num_val, num_test)

    @property
    def data_dim(self) -> int:
        return 1

    def prior_distribution(self) -> Distribution:
        """The true pi(mu) (scalar distribution)."""
        if self.prior == "normal":
            return Normal(torch.tensor(2.0), torch.tensor(math.sqrt(0.5)))
        if self.prior == "exponential":
            return Exponential(torch.tensor(1.0 / 2.0))
        return MixtureSameFamily(Categorical(torch.tensor([0.4, 0.6])), Normal(torch.tensor([0.0, 3.0]), 0.5))

    def log_marginal(self, x: Tensor) -> Tensor:
        """Exact log p(x) = log int N(x; mu, 1) pi(mu) dmu for x (N, 1), shape (N,)."""
        x = x.squeeze(-1)
        pi = self.prior_distribution()
        if isinstance(pi, Exponential):  # exponentially modified Gaussian
            rate = pi.rate
            return rate.log() + rate**2 / 2 - rate * x + torch.special.log_ndtr(x - rate)
        if isinstance(pi, Normal):
            return Normal(pi.loc, (pi.scale**2 + 1).sqrt()).log_prob(x)
        comp = pi.component_distribution
        return MixtureSameFamily(pi.mixture_distribution, Normal(comp.loc, (comp.scale**2 + 1).sqrt())).log_prob(x)

    def _load_splits(self) -> dict[str, SplitData]:
        n = sum(self.sizes)
        seed = keyed_generator(self.data_seed, Stream.SYNTHETIC_DATA).initial_seed()
        with seeded_global_rng(seed):  # torch.distributions samples from the global RNG
            mu = self.prior_distribution().sample((n, 1))
            x = mu + torch.randn(n, 1)
        return _split_rows(SplitData(x, latents=mu), self.sizes)
