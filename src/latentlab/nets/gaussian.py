"""The one amortized Gaussian encoder q(z|x) = N(mean(x), diag exp(log_var(x))).

Used by the VAE and by ALMOND's VAE warm-up, so the encoder, its clamp, its reparameterised draws and its
KL to the prior are written once (in `latentlab.posterior`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from latentlab.posterior import GaussianPosterior, LogLikelihood, gaussian_kl_to_standard_normal, reparameterized


class GaussianEncoder(nn.Module):
    """x (batch, D) -> (mean, log_var), each (batch, d), log_var clamped at `min_log_var`.

    The clamp keeps exp(-log_var) finite when q sharpens on easy data (binarized MNIST can drive a
    coordinate's variance to ~1e-7 within a few epochs); exp(-12) ~ 6e-6 is far below any posterior
    width an image model reaches.
    """

    def __init__(self, net: nn.Module, min_log_var: float = -12.0) -> None:
        super().__init__()
        self.net, self.min_log_var = net, float(min_log_var)
        self.register_load_state_dict_pre_hook(_nest_old_keys)

    @classmethod
    def build(cls, spec: object, data_dim: int, latent_dim: int, image_shape: Sequence[int] | None = None,
              min_log_var: float = -12.0) -> "GaussianEncoder":
        """From a `NetSpec` (MLP or conv), as the decoder is built."""
        from latentlab.nets import build_encoder  # the package imports this module; a cycle at import time

        return cls(build_encoder(spec, data_dim, 2 * latent_dim, image_shape), min_log_var)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        mean, log_var = self.net(x).chunk(2, dim=-1)
        return mean, log_var.clamp(min=self.min_log_var)

    def rsample(self, x: Tensor, n: int | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(z, KL(q || N(0, I))): reparameterised draws ((n,) batch, d) and the closed-form KL (batch,)."""
        mean, log_var = self(x)
        return reparameterized(mean, log_var, n, generator), gaussian_kl_to_standard_normal(mean, log_var)

    def posterior(self, x: Tensor, log_likelihood: LogLikelihood | None = None) -> GaussianPosterior:
        """q(z|x) under the posterior contract; `log_likelihood(z)` = log p(x | z) gives it its ELBO."""
        mean, log_var = self(x)
        return GaussianPosterior(mean, log_var, log_likelihood)


def _nest_old_keys(module: nn.Module, state_dict: dict, prefix: str, *_: object) -> None:
    """Checkpoints of latentlab 0.1 stored the encoder's net directly (`encoder.0.weight`); map them to
    `encoder.net.0.weight` so they still load."""
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "net.")]:
        state_dict[prefix + "net." + key[len(prefix):]] = state_dict.pop(key)


def elbo_terms(encoder: GaussianEncoder, log_likelihood: LogLikelihood, x: Tensor, num_samples: int = 1,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(E_q log p(x|z), KL(q || p)) per example, the expectation over `num_samples` reparameterised draws.

    One draw has no sample dim, so the VAE's hot path has no broadcast or reshape.
    """
    z, kl = encoder.rsample(x, None if num_samples == 1 else num_samples, generator)
    recon = log_likelihood(z)
    return (recon if num_samples == 1 else recon.mean(0)), kl
