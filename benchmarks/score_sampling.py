"""Denoiser scores on MNIST at a CPU budget (issue 13): sample quality and time of five ways to generate, and
inpainting against the mean image.

    python benchmarks/score_sampling.py --data-dir ../shared/data            # ~30 min on one CPU thread

Trains, on the same MNIST subset, a VAE and ALMOND (Bernoulli decoder, dynamic binarization, one latent size) and
a data-space denoiser (grey levels, Song & Ermon's ladder 1 -> 0.01), fits a latent denoiser prior to the VAE's and
ALMOND's aggregate posteriors (`latentlab.latent_prior`), then generates `--samples` images each way:

  (a) VAE, z ~ N(0, I)                      (b) VAE, z from the latent denoiser prior
  (c) ALMOND, z from the latent denoiser prior (its own N(0, I) samples are listed too)
  (d) data-space denoiser, annealed Langevin  (e) the same denoiser, ULA at sigma_min with as many score calls

and prints FID / precision / recall in latentlab's own MNIST classifier features (not Inception's: not comparable
with papers), the energy distance of the latent samples to held-out codes, and the sampling time. Then inpainting
(bottom half hidden) of `--inpaint` test digits by `latentlab-sample task=inpaint`: hidden-pixel MSE of each
model against filling in the mean training image. Nothing is written outside `--out` (the classifier is cached
there too).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable

import hydra
import torch
from omegaconf import OmegaConf
from torch import Tensor

from latentlab import api, latent_prior
from latentlab.builders import compose_config
from latentlab.evaluate import sample_quality_metrics
from latentlab.sample import sample as run_sample


def chunks(x: Tensor) -> Callable[[int], Tensor]:
    """generate(m) handing out the rows of precomputed samples in order (so sampling is timed apart from FID)."""
    rest = x

    def generate(m: int) -> Tensor:
        nonlocal rest
        out, rest = rest[:m], rest[m:]
        return out

    return generate


def timed(fn: Callable[[], Tensor]) -> tuple[Tensor, float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        x = fn()
    return x.detach().cpu().clamp(0, 1), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--almond-vae-epochs", type=int, default=2, help="ALMOND's VAE warm-up, within --epochs")
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--inpaint", type=int, default=200, help="test digits to inpaint")
    parser.add_argument("--denoiser-net", default="mlp", help="the data-space denoiser's conf/net preset (mlp | mlp_large | conv)")
    parser.add_argument("--prior-steps", type=int, default=3000, help="Adam steps of each latent denoiser")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="run directories (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="score_sampling_"))
    common = ["data=mnist", f"paths.data_dir={args.data_dir}", f"data.train_subset={args.train_subset}",
              "data.val_size=1000", f"trainer.max_epochs={args.epochs}", "test=false", "logger=none",
              "eval.val_nll.val_every_n_epochs=0", f"seed={args.seed}", "callbacks.image_grid=null"]
    latent = [f"model.latent_dim={args.latent}", "data.binarize=dynamic"]
    runs = {"vae": ["model=vae", *latent], "almond": ["model=almond", f"model.vae_epochs={args.almond_vae_epochs}", *latent],
            "denoiser": ["model=denoiser", "data.binarize=none", f"net={args.denoiser_net}"]}
    train_s: dict[str, float] = {}
    dirs = {"vae": root / "vae", "almond": root / "almond", "denoiser": root / f"denoiser-{args.denoiser_net}"}
    for name, overrides in runs.items():
        t0 = time.perf_counter()
        if not (dirs[name] / "checkpoints" / "last.ckpt").exists():  # a rerun with another --denoiser-net reuses the rest
            api.train([*common, *overrides], run_dir=dirs[name])
        train_s[name] = time.perf_counter() - t0
        print(f"trained {name} in {train_s[name]:.0f} s", flush=True)
    models = {name: api.load_model(dirs[name]) for name in runs}

    generator = torch.Generator().manual_seed(args.seed)
    settings = latent_prior.LatentPriorSettings(steps=args.prior_steps, seed=args.seed)
    priors, energy = {}, {}
    for name in ("vae", "almond"):
        model, dm = models[name]
        t0 = time.perf_counter()
        priors[name], _ = latent_prior.fit_latent_prior(model, dm.data("train"), settings)
        latent_prior.save(priors[name], settings, latent_prior.prior_path(dirs[name] / "checkpoints" / "last.ckpt"), name)
        distances, _ = latent_prior.held_out_energy_distances(model, priors[name], dm.data("test"), generator)
        energy[name] = (distances["standard"], distances["learned"])
        print(f"fitted {name}'s latent prior in {time.perf_counter() - t0:.0f} s; energy distance to held-out codes: "
              f"N(0, I) {energy[name][0]:.4f}, learned {energy[name][1]:.4f}", flush=True)

    den, _ = models["denoiser"]
    sample_cfg = compose_config(["ckpt_path=unused", "sampler=score_ula"], root, config_name="sample")
    ula = hydra.utils.instantiate(sample_cfg.sampler)  # conf/sampler/score_ula.yaml: as many score calls as annealed
    n = args.samples
    ways: dict[str, Callable[[], Tensor]] = {
        "(a) VAE, N(0, I) prior": lambda: models["vae"][0].model.sample(n, generator=generator, mean=True),
        "(b) VAE + latent denoiser prior": lambda: latent_prior.sample_latent_prior(models["vae"][0], priors["vae"], n, generator),
        "ALMOND, N(0, I) prior": lambda: models["almond"][0].model.sample(n, generator=generator, mean=True),
        "(c) ALMOND + latent denoiser prior": lambda: latent_prior.sample_latent_prior(models["almond"][0], priors["almond"], n, generator),
        f"(d) denoiser, annealed Langevin ({den.sampler.n_score_calls} score calls)": lambda: den.sample(n, generator=generator),
        f"(e) denoiser, ULA at sigma {ula.sigma} ({ula.n_score_calls} score calls)": lambda: den.sample(n, generator=generator, sampler=ula),
    }
    eval_cfg = compose_config(["ckpt_path=unused", f"eval.quality.classifier.cache_dir={root / 'classifier'}"], root,
                              config_name="eval")
    data_cfg = OmegaConf.create(den.run_config).data
    rows = []
    for label, make in ways.items():
        x, seconds = timed(make)
        q = sample_quality_metrics(den, data_cfg, eval_cfg.eval.quality, n, generator, chunks(x))
        assert q is not None
        rows.append((label, q["fid"], q["precision"], q["recall"], seconds))
        print(f"{label}: FID {q['fid']:.2f} in {seconds:.1f} s", flush=True)

    inpaint = {}
    for name in runs:
        out = root / f"inpaint_{name}.npz"
        cfg = compose_config([f"ckpt_path={api.quote(str(dirs[name] / 'checkpoints' / 'last.ckpt'))}", "task=inpaint",
                              "mask=bottom_half", f"n={args.inpaint}", f"out={api.quote(str(out))}",
                              f"paths.data_dir={args.data_dir}", f"seed={args.seed}"], root, config_name="sample")
        t0 = time.perf_counter()
        metrics = run_sample(cfg)
        inpaint[name] = (metrics["inpaint/mse"], metrics["inpaint/mean_image_mse"], time.perf_counter() - t0)

    print(f"\nMNIST, {args.train_subset} training images, {args.epochs} epochs, latent {args.latent}, {n} samples each; "
          f"FID/precision/recall in latentlab's MNIST classifier features (not Inception's)\n")
    print("| samples | FID | precision | recall | sampling s |\n| --- | --- | --- | --- | --- |")
    for label, fid, prec, rec, seconds in rows:
        print(f"| {label} | {fid:.2f} | {prec:.3f} | {rec:.3f} | {seconds:.1f} |")
    print("\n| latent model | energy distance to held-out codes: N(0, I) | learned prior |\n| --- | --- | --- |")
    for name, (standard, learned) in energy.items():
        print(f"| {name} | {standard:.4f} | {learned:.4f} |")
    print(f"\nInpainting, bottom half hidden, {args.inpaint} test digits (hidden-pixel MSE, lower is better):\n")
    print("| model | MSE | mean image MSE | s |\n| --- | --- | --- | --- |")
    for name, (mse, mean_mse, seconds) in inpaint.items():
        print(f"| {name} | {mse:.4f} | {mean_mse:.4f} | {seconds:.1f} |")
    print(f"\ntraining s: {', '.join(f'{k} {v:.0f}' for k, v in train_s.items())} (denoiser: net={args.denoiser_net}); "
          f"runs in {root}")


if __name__ == "__main__":
    main()
