"""Closed forms for the linear-Gaussian model (probabilistic PCA), the ground truth our tests use.

p(z) = N(0, I), p(x | z) = N(W z + b, s2 I)  =>  p(x) = N(b, W W^T + s2 I) and
p(z | x) = N(M^{-1} W^T (x - b) / s2 ... ) with M = I + W^T W / s2 (posterior precision).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from latentlab.generative import GenerativeModel
from latentlab.likelihoods import GaussianLikelihood


@dataclass
class LinearGaussian:
    """Parameters of p(x, z) = N(z; 0, I) N(x; W z + b, s2 I); W is (D, d)."""

    W: Tensor
    b: Tensor
    s2: float

    @property
    def data_dim(self) -> int:
        return self.W.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.W.shape[1]

    def marginal(self) -> torch.distributions.MultivariateNormal:
        cov = self.W @ self.W.T + self.s2 * torch.eye(self.data_dim, dtype=self.W.dtype)
        return torch.distributions.MultivariateNormal(self.b, covariance_matrix=cov)

    def log_marginal(self, x: Tensor) -> Tensor:
        """Exact log p(x), shape (batch,)."""
        return self.marginal().log_prob(x)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Exact p(z | x): mean (batch, d) and the shared covariance (d, d)."""
        eye = torch.eye(self.latent_dim, dtype=self.W.dtype)
        cov = torch.linalg.inv(eye + self.W.T @ self.W / self.s2)
        mean = (x - self.b) @ self.W @ cov.T / self.s2
        return mean, cov

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(x, z) drawn from the joint."""
        z = torch.randn(n, self.latent_dim, generator=generator, dtype=self.W.dtype)
        noise = torch.randn(n, self.data_dim, generator=generator, dtype=self.W.dtype)
        return z @ self.W.T + self.b + self.s2**0.5 * noise, z

    def to_model(self) -> GenerativeModel:
        """The same p(x, z) as a `GenerativeModel` with a linear decoder (for evaluators and samplers)."""
        decoder = nn.Linear(self.latent_dim, self.data_dim, dtype=self.W.dtype)
        with torch.no_grad():
            decoder.weight.copy_(self.W)
            decoder.bias.copy_(self.b)
        likelihood = GaussianLikelihood(self.data_dim, variance=self.s2)
        likelihood.log_var = torch.full((self.data_dim,), math.log(self.s2), dtype=self.W.dtype)  # no float32 rounding
        return GenerativeModel(decoder, likelihood, self.latent_dim).to(self.W.dtype)

    @staticmethod
    def random(data_dim: int, latent_dim: int, s2: float = 0.5, generator: torch.Generator | None = None) -> "LinearGaussian":
        W = torch.randn(data_dim, latent_dim, generator=generator)
        b = torch.randn(data_dim, generator=generator)
        return LinearGaussian(W, b, s2)


def ppca_max_log_likelihood(x: Tensor, latent_dim: int) -> float:
    """Mean per-example log-likelihood of the maximum-likelihood PPCA fit (Tipping & Bishop 1999).

    With the sample covariance S's eigenvalues l_1 >= ... >= l_D, the MLE noise is the mean of the
    discarded eigenvalues and the fitted covariance keeps the top `latent_dim` ones exactly; this is
    the ceiling any model of this class (VAE, ALMOND with a linear decoder) can reach on `x`.
    """
    x = x.double()
    n, D = x.shape
    mu = x.mean(0)
    S = (x - mu).T @ (x - mu) / n
    evals, evecs = torch.linalg.eigh(S)
    evals, evecs = evals.flip(0), evecs.flip(1)
    s2 = evals[latent_dim:].mean()
    kept = evals[:latent_dim].clamp(min=s2)
    U = evecs[:, :latent_dim]
    W = U * (kept - s2).sqrt()
    cov = W @ W.T + s2 * torch.eye(D, dtype=x.dtype)
    dist = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov)
    return float(dist.log_prob(x).mean())
