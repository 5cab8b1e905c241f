"""`latentlab-sample ckpt_path=C n=N out=FILE.npz`: samples and inverse problems from any checkpoint.

    latentlab-sample ckpt_path=run/checkpoints/last.ckpt n=64 out=samples.npz         # prior / Langevin samples
    latentlab-sample ckpt_path=C task=inpaint mask=bottom_half|left_half|random n=16 out=inpaint.npz
    latentlab-sample ckpt_path=C task=denoise noise=0.2 n=16 out=denoise.npz
    latentlab-sample ckpt_path=<denoiser> sampler=score_ula                           # another score sampler
    latentlab-sample ckpt_path=C task=fit_prior      # fit a latent denoiser prior to C's aggregate posterior
    latentlab-sample ckpt_path=C prior=latent_denoiser n=64 out=samples.npz          # and sample through it

Latent models sample x = E[x | z], z ~ p(z) (`model.sample`); denoisers sample by Langevin with their
Tweedie score (the checkpoint's `model.sampler`, or `sampler=<preset>` from conf/sampler/). Inverse
problems take the first n test examples (`target`), hide or corrupt them (`y`, `mask`: 1 = observed) and
write completions `x` (see `latentlab.inverse` for the two routes), plus hidden-pixel MSE/PSNR beside
the mean training image's, in FILE.json. npz arrays are shaped like the data ((n, C, H, W) for images,
which also get FILE.png). Bad input ends with one line `latentlab: error: ...`, exit 2, nothing written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from latentlab import entry, latent_prior
from latentlab.errors import CheckpointError, ConfigError
from latentlab.inverse import (
    MASKS,
    gaussian_observation,
    hidden_pixel_metrics,
    latent_completions,
    make_mask,
    masked_log_likelihood,
    red_map,
    score_measurement,
)

log = logging.getLogger("latentlab")
TASKS = ("sample", "inpaint", "denoise", "fit_prior")
SOLVERS = ("langevin", "red")
PRIORS = ("standard", "latent_denoiser")


def check_request(cfg: DictConfig) -> None:
    """Everything about the command line that can be wrong, before a checkpoint is read."""
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task!r} is not a task; choose one of {'|'.join(TASKS)}")
    if cfg.task == "inpaint" and cfg.mask not in MASKS:
        raise ConfigError(f"mask={cfg.mask!r} is not a mask; choose one of {'|'.join(MASKS)}")
    if isinstance(cfg.n, bool) or not isinstance(cfg.n, int) or cfg.n < 1:
        raise ConfigError(f"n must be an integer >= 1, got {cfg.n!r}")
    if cfg.task == "denoise" and not (isinstance(cfg.noise, (int, float)) and cfg.noise > 0):
        raise ConfigError(f"noise must be a number > 0 for task=denoise, got {cfg.noise!r}")
    if cfg.prior not in PRIORS:
        raise ConfigError(f"prior={cfg.prior!r} is not a prior; choose one of {'|'.join(PRIORS)}")
    if cfg.solver not in SOLVERS:
        raise ConfigError(f"solver={cfg.solver!r} is not a solver; choose one of {'|'.join(SOLVERS)} (red: denoisers only)")
    if not str(cfg.out).endswith(".npz"):
        raise ConfigError(f"out={cfg.out!r} must name a .npz file, e.g. out=samples.npz")


def load_trained(ckpt_path: str, data_dir: str) -> tuple[Any, Any]:
    """(model with its weights, eval mode; its data module set up for test) from any latentlab checkpoint."""
    from latentlab.builders import build_datamodule, build_model
    from latentlab.checkpoint_loading import load_checkpoint_safely

    ckpt = load_checkpoint_safely(Path(ckpt_path).expanduser())
    run_cfg = ckpt["latentlab"].get("config")
    if not run_cfg:
        raise CheckpointError(f"{ckpt_path} carries no run config (not written by latentlab-train); cannot rebuild it")
    run_cfg = OmegaConf.create(run_cfg)
    with open_dict(run_cfg):
        run_cfg.paths.data_dir = data_dir
        if "data_dir" in run_cfg.data:
            run_cfg.data.data_dir = data_dir
        run_cfg.model.pop("eval", None)
    datamodule = build_datamodule(run_cfg)
    datamodule.setup("test")
    model = build_model(run_cfg, datamodule)
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_path} does not fit {ckpt['latentlab']['method']!r} as this latentlab builds it "
                              f"(missing {list(missing)[:4]}, unexpected {list(unexpected)[:4]})")
    if hasattr(model, "on_load_checkpoint"):
        model.on_load_checkpoint(ckpt)
    return model.eval(), datamodule


@torch.no_grad()  # the latent Langevin samplers take their own gradients (enable_grad inside)
def solve(cfg: DictConfig, model: Any, datamodule: Any, generator: torch.Generator) -> tuple[dict[str, Any], dict[str, float]]:
    """The arrays to write and the metrics of `cfg.task` (see module doc)."""
    is_denoiser = getattr(model, "method", "") == "denoiser"
    score_sampler = hydra.utils.instantiate(cfg.sampler) if cfg.get("sampler") else None
    if is_denoiser and (cfg.task == "fit_prior" or cfg.prior != "standard"):
        raise ConfigError("a latent prior is for latent models (vae, avb, almond); this checkpoint is a denoiser, "
                          "which samples by Langevin in data space: drop task=fit_prior / prior=latent_denoiser")
    if cfg.task == "fit_prior":
        return fit_prior(cfg, model, datamodule, generator)
    if cfg.task == "sample":
        if cfg.prior == "latent_denoiser":
            prior = latent_prior.load(latent_prior.prior_path(cfg.ckpt_path))
            return {"x": latent_prior.sample_latent_prior(model, prior, cfg.n, generator)}, {}
        extra = {"sampler": score_sampler} if is_denoiser else {}
        return {"x": model.sample(cfg.n, generator=generator, **extra)}, {}
    target = datamodule.data("test")[: cfg.n]
    n = target.shape[0]
    if cfg.task == "inpaint":
        mask = make_mask(str(cfg.mask), n, target.shape[1], getattr(datamodule, "image_shape", None), generator)
        y = target * mask
        obs_noise = float(cfg.obs_noise)
    else:
        mask = torch.ones_like(target)
        y = target + float(cfg.noise) * torch.randn(target.shape, generator=generator)
        obs_noise = float(cfg.noise)
    if cfg.solver == "red" and not is_denoiser:
        raise ConfigError(f"solver=red needs a denoiser checkpoint; this is {getattr(model, 'method', '?')!r}: use solver=langevin")
    if cfg.solver == "red":
        x = red_map(model.denoiser, y, mask, float(cfg.red_sigma), obs_noise, int(cfg.red_steps))
    elif is_denoiser:
        x = model.sample(n, generator=generator, sampler=score_sampler, measurement=score_measurement(y, mask, obs_noise))
    else:
        gm = model.model
        log_obs = masked_log_likelihood(gm, y, mask) if cfg.task == "inpaint" else gaussian_observation(gm, y, obs_noise)
        sampler = hydra.utils.instantiate(cfg.latent_sampler)
        completions = latent_completions(gm, y, mask if cfg.task == "inpaint" else torch.zeros_like(mask), log_obs,
                                         sampler, 1, generator)
        x = completions[0]
    if cfg.task == "inpaint":  # observed pixels are the observation's, whatever the solver did with them
        x = mask * y + (1.0 - mask) * x
    metrics = {f"{cfg.task}/{k}": v for k, v in hidden_pixel_metrics(x, target, mask).items()}
    mean_image = datamodule.data("train").mean(0, keepdim=True).expand_as(target)
    metrics.update({f"{cfg.task}/mean_image_{k}": v for k, v in hidden_pixel_metrics(mean_image, target, mask).items()})
    return {"x": x, "y": y, "target": target, "mask": mask}, metrics


def fit_prior(cfg: DictConfig, model: Any, datamodule: Any, generator: torch.Generator) -> tuple[dict[str, Any], dict[str, float]]:
    """Fit the latent prior, save it beside the checkpoint, and say how much closer than N(0, I) its samples come
    to held-out codes (energy distance to the test split's aggregate posterior, 0 for the same law)."""
    settings = latent_prior.LatentPriorSettings(**OmegaConf.to_container(cfg.latent_prior, resolve=True))  # type: ignore[arg-type]
    prior, _ = latent_prior.fit_latent_prior(model, datamodule.data("train"), settings)
    path = latent_prior.save(prior, settings, latent_prior.prior_path(cfg.ckpt_path), str(cfg.ckpt_path))
    distances, learned = latent_prior.held_out_energy_distances(model, prior, datamodule.data("test"), generator)
    metrics = {f"fit_prior/energy_distance_{k}": v for k, v in distances.items()}
    log.info("latent prior fitted to %d codes, saved to %s", min(settings.n_codes, len(datamodule.data("train"))), path)
    return {"x": latent_prior.decode_mean(model, learned[: cfg.n])}, metrics


def sample(cfg: DictConfig) -> dict[str, float]:
    """Run one `latentlab-sample` request; returns its metrics (also written to <out>.json)."""
    from latentlab.builders import resolve_paths, write_json_atomic
    from latentlab.callbacks.images import save_image_grid

    check_request(cfg)
    resolve_paths(cfg)
    model, datamodule = load_trained(str(cfg.ckpt_path), str(cfg.paths.data_dir))
    generator = torch.Generator().manual_seed(int(cfg.seed))
    arrays, metrics = solve(cfg, model, datamodule, generator)
    entry.mark_started()  # results exist from here: a failure now keeps the run directory, marked FAILED
    shape = getattr(model, "image_shape", None)
    out = Path(str(cfg.out)).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    reshape = (lambda t: t.detach().cpu().reshape(t.shape[0], *shape)) if shape else (lambda t: t.detach().cpu())
    np.savez(out, **{k: reshape(v).numpy() for k, v in arrays.items()})
    if shape:  # one row each of originals, observations and completions (first 16), or a grid of samples
        rows = [arrays[k][:16].cpu() for k in ("target", "y", "x") if k in arrays]
        nrow = rows[0].shape[0] if len(rows) > 1 else 8
        save_image_grid(torch.cat(rows).clamp(0, 1), shape, out.with_suffix(".png"), nrow=nrow, title=str(cfg.task))
    write_json_atomic(out.with_suffix(".json"), {**metrics, "task": cfg.task, "ckpt_path": str(cfg.ckpt_path),
                                                 "method": getattr(model, "method", "?")})
    log.info("wrote %s %s", out, {k: round(v, 4) for k, v in metrics.items()})
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://latentlab.conf", config_name="sample")
@entry.job
def _hydra_main(cfg: DictConfig) -> Any:
    return sample(cfg)


def main(argv: Any = None) -> None:
    entry.run(_hydra_main, argv=argv)


if __name__ == "__main__":
    main()
