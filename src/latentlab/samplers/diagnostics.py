"""MCMC convergence diagnostics: split R-hat and effective sample size (Vehtari et al. 2021).

Samples are shaped (n_draws, n_chains, ...); every trailing coordinate (latent dim, example, ...)
gets its own value, computed in one vectorised pass, so a whole batch of ALMOND's persistent chains
can be checked at once. The rank-normalised variants ("bulk", the paper's recommendation and ArviZ's
default) are robust to heavy tails; `rank_normalize=False` gives the classic Gelman-Rubin versions.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import ndtri
from scipy.stats import rankdata
from torch import Tensor


def _as_draws(samples: Tensor | np.ndarray) -> Tensor:
    x = torch.as_tensor(samples).detach().to(dtype=torch.float64, device="cpu")
    if x.dim() < 2 or x.shape[0] < 4:
        raise ValueError(f"samples must be (n_draws >= 4, n_chains, ...), got shape {tuple(x.shape)}")
    return x


def _split_chains(x: Tensor) -> Tensor:
    """(n, m, ...) -> (n // 2, 2 m, ...): first and second halves as separate chains (middle draw
    dropped when n is odd), so a drift within a chain shows up as disagreement between chains."""
    half = x.shape[0] // 2
    return torch.cat([x[:half], x[x.shape[0] - half :]], dim=1)


def _rank_normalize(x: Tensor) -> Tensor:
    """Normal scores of the pooled ranks, Phi^-1((r - 3/8) / (S + 1/4)) (Blom), per coordinate."""
    n, m = x.shape[:2]
    ranks = rankdata(x.reshape(n * m, -1).numpy(), axis=0)  # average ranks for ties
    scores = ndtri((ranks - 0.375) / (n * m + 0.25))
    return torch.from_numpy(scores).reshape(x.shape)


def _rhat_of_chains(x: Tensor) -> Tensor:
    """Gelman-Rubin sqrt(var+ / W) with W the mean within-chain and B / n the between-chain variance."""
    n = x.shape[0]
    within = x.var(0).mean(0)
    between = n * x.mean(0).var(0)
    var_plus = (n - 1) / n * within + between / n
    return (var_plus / within).sqrt()


def rhat(samples: Tensor | np.ndarray, rank_normalize: bool = True) -> Tensor:
    """Split R-hat per trailing coordinate of samples (n_draws, n_chains, ...) -> samples.shape[2:].

    With `rank_normalize` (Vehtari et al. 2021, eq. 4-5): the max of the split R-hat of the
    rank-normalised draws (location) and of the rank-normalised |draw - median| (scale).
    Values above ~1.01 mean the chains have not mixed.
    """
    x = _split_chains(_as_draws(samples))
    if not rank_normalize:
        return _rhat_of_chains(x)
    folded = (x - x.flatten(0, 1).median(0).values).abs()
    return torch.maximum(_rhat_of_chains(_rank_normalize(x)), _rhat_of_chains(_rank_normalize(folded)))


def _autocovariance(x: Tensor) -> Tensor:
    """Biased autocovariance along dim 0 for every chain and coordinate, by FFT (O(n log n))."""
    n = x.shape[0]
    centered = x - x.mean(0)
    size = 1 << (2 * n - 1).bit_length()  # zero-pad: linear, not circular, correlation
    spectrum = torch.fft.rfft(centered, n=size, dim=0)
    return torch.fft.irfft(spectrum * spectrum.conj(), n=size, dim=0)[:n] / n


def effective_sample_size(samples: Tensor | np.ndarray, rank_normalize: bool = True, split: bool = True) -> Tensor:
    """Multi-chain ESS per trailing coordinate of samples (n_draws, n_chains, ...) -> samples.shape[2:].

    Vehtari et al. (2021), eq. 10-11: autocorrelations combined across chains,
    rho_t = 1 - (W - mean_chains(autocov_t)) / var+, summed with Geyer's (1992) initial monotone
    sequence estimator (pairs rho_2k + rho_2k+1, truncated at the first non-positive pair and made
    non-increasing): tau = -1 + 2 sum_k P_k, ESS = n_draws * n_chains / tau. `split` and
    `rank_normalize` as in `rhat` (both on: "bulk-ESS").
    """
    x = _as_draws(samples)
    if split:
        x = _split_chains(x)
    if rank_normalize:
        x = _rank_normalize(x)
    n, m = x.shape[:2]
    acov = _autocovariance(x)
    within = acov[0].mean(0) * n / (n - 1)
    var_plus = within * (n - 1) / n
    if m > 1:
        var_plus = var_plus + x.mean(0).var(0)
    rho = 1.0 - (within - acov.mean(1)) / var_plus
    rho[0] = 1.0
    n_pairs = n // 2
    pairs = rho[0 : 2 * n_pairs : 2] + rho[1 : 2 * n_pairs : 2]
    initial_positive = (pairs > 0).to(torch.int64).cumprod(0).to(pairs.dtype)
    monotone = torch.cummin(pairs, dim=0).values
    tau = -1.0 + 2.0 * (monotone * initial_positive).sum(0)
    total = n * m
    return total / tau.clamp(min=1.0 / math.log10(total))
