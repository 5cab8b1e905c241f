"""A learned latent prior for any latent model: a denoiser fitted to its aggregate posterior.

A VAE's (or AVB's, or ALMOND's) aggregate posterior q(z) = mean_i q(z | x_i) rarely fills N(0, I): prior draws
land in "holes" no training image maps to and decode to blurs. The two-stage fix fits a second model to the
codes; here that model is a noise-conditional denoiser on z (`models.denoiser.fit_denoiser`, Song & Ermon's
ladder from the codes' spread) and sampling is annealed Langevin with its Tweedie score, then x = E[x | z].

The codes come through the posterior contract (`LatentVariableModel.aggregate_posterior`): encoder draws for the
VAE and AVB, ALMOND's persistent chains. `fit_latent_prior` -> `save`/`load` (a plain weights-only file next to
the checkpoint, `latent_prior.pt`) -> `sample_latent_prior`. CLI: `latentlab-sample task=fit_prior`, then
`latentlab-sample prior=latent_denoiser`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from latentlab.errors import CheckpointError
from latentlab.models.denoiser import Denoiser, fit_denoiser
from latentlab.samplers.score import ScoreAnnealedLangevin

PRIOR_FILE = "latent_prior.pt"


@dataclass
class LatentPriorSettings:
    """How the latent denoiser is fitted and sampled. `sigma_min_rel`: the last level as a fraction of the codes'
    std (the learned score is poor below a few percent of it: see nets.denoiser.sigma_features); the Langevin
    step at level j is `step_rel` x sigma_j^2 (Song & Ermon's 2e-5 at sigma 0.01 is 0.2)."""

    n_codes: int = 20000
    steps: int = 3000
    n_levels: int = 10
    sigma_min_rel: float = 0.05
    hidden_dims: tuple[int, ...] = (256, 256)
    step_rel: float = 0.2
    n_steps: int = 50
    seed: int = 0


def prior_path(ckpt_path: str | Path) -> Path:
    """Where the latent prior of a checkpoint lives: beside it."""
    return Path(ckpt_path).expanduser().parent / PRIOR_FILE


def _sampler(model: Denoiser, settings: LatentPriorSettings) -> ScoreAnnealedLangevin:
    return ScoreAnnealedLangevin(step_size=settings.step_rel * model.sigmas[-1] ** 2, n_steps=settings.n_steps,
                                 levels=model.sigmas, final_denoise=True)


def fit_latent_prior(module: Any, train_x: Tensor, settings: LatentPriorSettings | None = None) -> tuple[Denoiser, Tensor]:
    """(the fitted latent denoiser, the codes it was fitted to) for a trained latent model and its training data."""
    settings = settings or LatentPriorSettings()
    generator = torch.Generator().manual_seed(settings.seed)
    rows = torch.randperm(train_x.shape[0], generator=generator)[: settings.n_codes].sort().values
    codes = module.aggregate_posterior(train_x, generator, index=rows).detach().cpu()
    std = float(codes.std())
    model = fit_denoiser(codes, steps=settings.steps, n_levels=settings.n_levels, sigma_min=settings.sigma_min_rel * std,
                         net={"hidden_dims": list(settings.hidden_dims), "activation": "silu"}, seed=settings.seed)
    model.sampler = _sampler(model, settings)
    return model, codes


def save(model: Denoiser, settings: LatentPriorSettings, path: str | Path, source: str) -> Path:
    """A weights-only-loadable file: the denoiser's weights, its ladder and the settings."""
    path = Path(path)
    payload = {"state_dict": model.state_dict(), "settings": asdict(settings), "source": source,
               "denoiser": {"data_dim": model.data_dim, "sigma_max": model.sigmas[0], "sigma_min": model.sigmas[-1],
                            "n_levels": len(model.sigmas), "sigma_data": model.denoiser.sigma_data}}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load(path: str | Path) -> Denoiser:
    """The latent denoiser saved by `save`, with its annealed sampler; a clear error when there is none."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no latent prior fitted for this checkpoint ({path} does not exist): run "
                              f"latentlab-sample ckpt_path=<the checkpoint> task=fit_prior first")
    payload = torch.load(path, weights_only=True, map_location="cpu")
    settings = LatentPriorSettings(**{**payload["settings"], "hidden_dims": tuple(payload["settings"]["hidden_dims"])})
    model = Denoiser(**payload["denoiser"], net={"hidden_dims": list(settings.hidden_dims), "activation": "silu"})
    model.load_state_dict(payload["state_dict"])
    model.sampler = _sampler(model, settings)
    return model.eval()


@torch.no_grad()
def decode_mean(module: Any, z: Tensor) -> Tensor:
    """x = E[x | z] (n, data_dim) under the module's generative model: how a latent draw becomes a picture."""
    return module.model.likelihood.mean(module.model.decode(z.to(module.device)))


def sample_latent_prior(module: Any, prior: Denoiser, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n samples x = E[x | z] (n, data_dim), z by annealed Langevin on the latent denoiser's score."""
    return decode_mean(module, prior.sample(n, generator=generator))


def held_out_energy_distances(module: Any, prior: Denoiser, test_x: Tensor, generator: torch.Generator,
                               n: int = 1000) -> tuple[dict[str, float], Tensor]:
    """How much of the prior hole the fitted prior closes: the energy distances of N(0, I) draws (`standard`) and of
    the prior's draws (`learned`) to the codes of n held-out examples; and those prior draws."""
    held = module.aggregate_posterior(test_x[:n], generator).cpu()
    learned = prior.sample(len(held), generator=generator)
    standard = torch.randn(held.shape, generator=generator)
    return {"standard": energy_distance(standard, held), "learned": energy_distance(learned, held)}, learned


def energy_distance(a: Tensor, b: Tensor) -> float:
    """Székely's energy distance 2 E|a - b| - E|a - a'| - E|b - b'| between two samples (0 iff same law)."""
    a, b = a.double(), b.double()
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())
