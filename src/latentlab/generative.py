"""The one abstraction: p(x, z) = p(z) p(x | z).

Every inference method (VAE, AVB, ALMOND) fits a `GenerativeModel`; every evaluator (importance
sampling, AIS, BDMC) needs only `log_joint`. Nothing here knows how the posterior is inferred.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from latentlab.likelihoods import Likelihood

LOG_2PI = math.log(2.0 * math.pi)


class StandardNormalPrior(nn.Module):
    """p(z) = N(0, I) (ALMOND's pi_0). A module so that it moves with `.to(device)`."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        if latent_dim <= 0:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim}")
        self.latent_dim = latent_dim
        self.register_buffer("_ref", torch.zeros(()), persistent=False)

    def log_prob(self, z: Tensor) -> Tensor:
        return -0.5 * (z.pow(2).sum(-1) + self.latent_dim * LOG_2PI)

    def score(self, z: Tensor) -> Tensor:
        """grad_z log p(z), exact, so samplers can skip autograd through the prior."""
        return -z

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(n, self.latent_dim, generator=generator, device=self._ref.device, dtype=self._ref.dtype)


class GenerativeModel(nn.Module):
    """prior p(z), decoder z -> likelihood params, likelihood p(x | params).

    `x` is flat `(batch, data_dim)`; `z` may carry extra leading dims `(..., batch, latent_dim)`
    (samples, chains) and `log_joint` broadcasts `x` against them.
    """

    def __init__(self, decoder: nn.Module, likelihood: Likelihood, latent_dim: int) -> None:
        super().__init__()
        self.prior = StandardNormalPrior(latent_dim)
        self.decoder = decoder
        self.likelihood = likelihood

    @property
    def latent_dim(self) -> int:
        return self.prior.latent_dim

    def decode(self, z: Tensor) -> Tensor:
        """Decoder on any leading shape: flattens to (N, latent_dim) for the network."""
        lead = z.shape[:-1]
        params = self.decoder(z.reshape(-1, z.shape[-1]))
        return params.reshape(*lead, params.shape[-1])

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z) with x (batch, D) broadcast against z (..., batch, d)."""
        return self.likelihood.log_prob(x, self.decode(z))

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x, z) = log p(x | z) + log p(z): the only thing samplers and evaluators need."""
        return self.log_likelihood(x, z) + self.prior.log_prob(z)

    def joint(self, x: Tensor, decode: Callable[[Tensor], Tensor] | None = None) -> "JointDensity":
        """z -> log p(x, z) for this batch x, with the cheaper `score(z)`: what Langevin samplers target."""
        return JointDensity(self, x, decode or self.decode)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, mean: bool = True) -> Tensor:
        """n draws of x (or of E[x | z] with `mean=True`, the usual picture of a sample)."""
        params = self.decode(self.prior.sample(n, generator=generator))
        return self.likelihood.mean(params) if mean else self.likelihood.sample(params, generator=generator)


class JointDensity:
    """log p(x, z) as a function of z for one batch x (x (batch, D), z (..., batch, d)), through `decode`.

    `score(z)` is its gradient in z without its value: the decoder's vector-Jacobian product with the likelihood's
    closed-form score in the decoder's outputs (`param_score`), plus the prior's score. That is the gradient autograd
    takes of the value (the same sums, tested), minus the log-density's forward and backward over every output: on
    MNIST's 784 Bernoulli pixels, the softplus of every logit of every chain (ALMOND's E-step, 5 moves of 1000 chains:
    1.01-1.05x the hand-written autograd loop before, 0.98-1.00x after). Likelihoods without a closed form are
    differentiated as before.
    """

    def __init__(self, model: GenerativeModel, x: Tensor, decode: Callable[[Tensor], Tensor]) -> None:
        self.model, self.x, self.decode = model, x, decode

    def __call__(self, z: Tensor) -> Tensor:
        return self.model.likelihood.log_prob(self.x, self.decode(z)) + self.model.prior.log_prob(z)

    def score(self, z: Tensor) -> Tensor:
        """grad_z log p(x, z), shaped like z; works under a caller's no_grad."""
        with torch.enable_grad():
            leaf = z.detach().requires_grad_(True)
            params = self.decode(leaf)
            outer = self.model.likelihood.param_score(self.x, params.detach())
            if outer is None:  # no closed form: autograd of the log-likelihood
                params = self.model.likelihood.log_prob(self.x, params)
                outer = torch.ones_like(params)
            (grad,) = torch.autograd.grad(params, leaf, grad_outputs=outer)
        return grad + self.model.prior.score(z.detach())
