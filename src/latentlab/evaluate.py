"""`latentlab-eval ckpt_path=PATH`: one evaluator for every method.

Rebuilds any method's model from the config saved in its checkpoint and judges it on the test split:

- log p(x) (`test/nll` +/- `test/nll_se`, nats per example) in the Lightning test pass, with the
  method's proposal (importance sampling) or AIS (`eval.nll`, `eval.ais_init`);
- `eval.bdmc`: BDMC bounds on data simulated from the model (`test/bdmc_lower|upper|gap`): how far to trust AIS;
- `eval.gaps`: the inference gap log p(x) - the method's own bound, split into approximation and
  amortization gaps for amortized Gaussian posteriors (`test/inference_gap`, ...);
- `eval.samples`: FID/KID/IS/precision/recall in a per-dataset classifier's feature space, trained
  once and cached under the data directory (`test/fid`, ..., `test/classifier_acc`); for a latent model with a
  fitted latent prior beside its checkpoint (`latentlab-sample task=fit_prior`) the same through that prior
  (`test/latent_prior_fid`, ...);
- 2-d latents: `posteriors.png`, exact posteriors beside the method's posterior draws.

Writes `metrics.json` and `metrics.md` into the run directory; a multirun over checkpoints also writes
the comparison table (`latentlab.compare`). With `logger=wandb` the metrics become the run summary
and the pictures W&B images. Checkpoints are read with `torch.load(weights_only=True)`: no code from a
checkpoint is executed.
"""

from __future__ import annotations

import logging
import math
import os
import time
import dataclasses
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable, Iterator

import hydra
import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor

from latentlab.builders import (
    build_datamodule,
    build_loggers,
    build_model,
    build_trainer,
    resolve_paths,
    scalar_metrics,
    write_json_atomic,
)
from latentlab.report import metrics_markdown
from latentlab.checkpointing import load_checkpoint_safely
from latentlab import entry, latent_prior
from latentlab.config_schema import validate_eval_config
from latentlab.errors import CheckpointError, ConfigError, DataError
from latentlab.metrics.classifier import DomainClassifier, Splits, load_or_train_classifier
from latentlab.estimators import GapSettings, NLLSettings, ais_from_settings
from latentlab.metrics.posterior import (
    bdmc_metrics,
    inference_gap_metrics,
    plot_posterior_pictures,
    posterior_pictures,
)
from latentlab.models.base import LatentVariableModel
from latentlab.progress import progress
from latentlab.rng import Stream, keyed_generator

log = logging.getLogger("latentlab")
#: Data-module arguments that give the canonical labelled splits a dataset's classifier is trained on.
CANONICAL_DATA = {"binarize": "none", "binarize_threshold": None, "train_subset": None, "val_subset": None,
                  "test_subset": None, "val_size": 0}


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a latentlab checkpoint with `weights_only=True`; also refuse one without the run config eval needs."""
    ckpt = load_checkpoint_safely(path)
    if not ckpt["latentlab"].get("config"):
        raise CheckpointError(f"{path} carries no run config (it was not written by latentlab-train), so "
                              "latentlab-eval cannot rebuild its model")
    return ckpt


# --------------------------------------------------------------------------- settings


@dataclass
class Analyses:
    """The analyses after the test pass (conf/eval.yaml `eval.*`), checked before anything is loaded."""

    samples: int = 0
    gaps: int = 0
    bdmc: int = 0
    posterior_plots: int = 4
    posterior_draws: int = 500
    batch_size: int = 100
    grid_limit: float = 6.0
    grid_resolution: int = 121
    gap: GapSettings = field(default_factory=GapSettings)

    @classmethod
    def from_config(cls, cfg: DictConfig | None) -> "Analyses":
        cfg = cfg if cfg is not None else OmegaConf.create({})
        counts = {key: cfg.get(key, getattr(cls, key)) for key in
                  ("samples", "gaps", "bdmc", "posterior_plots", "posterior_draws", "batch_size")}
        for key, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "batch_size" else 0):
                raise ConfigError(f"eval.{key} must be an integer >= {1 if key == 'batch_size' else 0}, got {value!r}")
        grid = cfg.get("grid") or {}
        gap = OmegaConf.to_container(cfg.gap, resolve=True) if cfg.get("gap") is not None else {}
        gap = {k: v for k, v in gap.items() if v is not None}  # type: ignore[union-attr]
        try:
            gap_settings = GapSettings(**gap)  # type: ignore[arg-type]
        except TypeError as exc:
            raise ConfigError(f"eval.gap: {exc}") from None
        quality = cfg.get("quality") or {}
        if quality.get("generated", "mean") not in ("mean", "sample"):
            raise ConfigError(f"eval.quality.generated must be mean|sample, got {quality.get('generated')!r}")
        limit, resolution = grid.get("limit", 6.0), grid.get("resolution", 121)
        if not (isinstance(limit, (int, float)) and limit > 0 and isinstance(resolution, int) and resolution >= 2):
            raise ConfigError(f"eval.grid needs limit > 0 and an integer resolution >= 2, got {limit!r}, {resolution!r}")
        return cls(**counts, grid_limit=float(limit), grid_resolution=resolution, gap=gap_settings)


# --------------------------------------------------------------------------- sample quality


def data_config_by_name(name: str, cfg: DictConfig) -> DictConfig:
    """conf/data/<name>.yaml resolved against this run's `paths.data_dir` and `seed`."""
    source = files("latentlab.conf").joinpath("data", f"{name}.yaml")
    if not source.is_file():
        known = sorted(p.name.removesuffix(".yaml") for p in files("latentlab.conf").joinpath("data").iterdir()
                       if p.name.endswith(".yaml"))
        raise ConfigError(f"unknown dataset {name!r} for train_classifier; choose one of {known}")
    root = OmegaConf.create({"paths": {"data_dir": cfg.paths.data_dir}, "seed": cfg.get("seed"),
                             "data": OmegaConf.load(str(source))})
    return OmegaConf.create(OmegaConf.to_container(root, resolve=True)["data"])  # type: ignore[index]


def classifier_splits(data_cfg: DictConfig) -> tuple[str, Splits, tuple[int, ...] | None] | None:
    """(dataset name, (x_train, y_train, x_test, y_test), image_shape) of a dataset's canonical splits:
    grey levels, no subsets, validation folded back into training. None when the dataset has no labels."""
    canonical = OmegaConf.to_container(data_cfg, resolve=True)
    assert isinstance(canonical, dict)
    canonical.update({k: v for k, v in CANONICAL_DATA.items() if k in canonical})
    datamodule = hydra.utils.instantiate(canonical, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("test")
    labels = [datamodule.labels(s) for s in ("train", "val", "test")]
    if labels[0] is None or labels[2] is None:
        return None
    x_train, y_train = datamodule.data("train"), labels[0]
    if datamodule.num_val and labels[1] is not None:
        x_train, y_train = torch.cat([x_train, datamodule.data("val")]), torch.cat([y_train, labels[1]])
    splits = (x_train, y_train, datamodule.data("test"), labels[2])
    return datamodule.name, splits, getattr(datamodule, "image_shape", None)


def dataset_classifier(data_cfg: DictConfig, qcfg: DictConfig, device: torch.device | str = "cpu"
                       ) -> tuple[DomainClassifier, Splits] | None:
    """The dataset's cached classifier (trained on a miss) and the splits it was trained on; None without labels."""
    found = classifier_splits(data_cfg)
    if found is None:
        return None
    name, splits, image_shape = found
    c = qcfg.classifier
    batch_size = int(c.get("batch_size", 128))
    epochs = max(int(c.epochs), math.ceil(int(c.get("min_steps", 0)) / math.ceil(len(splits[0]) / batch_size)))
    cache_dir = c.cache_dir if c.get("cache_dir") is not None else data_cfg.get("data_dir", "data")
    classifier, acc = load_or_train_classifier(name, cache_dir, lambda: splits, image_shape, epochs=epochs,
                                               seed=int(c.seed), device=device, batch_size=batch_size)
    log.info("%s classifier: test accuracy %.4f (cache %s/%s)", name, acc, cache_dir, name)
    return classifier, splits


def sample_quality_metrics(model: LatentVariableModel, data_cfg: DictConfig, qcfg: DictConfig, n: int,
                           generator: torch.Generator, generate: Callable[[int], Tensor] | None = None,
                           ) -> dict[str, float] | None:
    """FID/KID/IS/precision/recall of n generated samples against n real test images (fewer if the test
    split is smaller), plus the classifier's own test accuracy; None (with a note) without labels.
    `generate(m)` makes m samples; by default the model's own (latent models: its prior p(z))."""
    device = next(model.parameters()).device
    found = dataset_classifier(data_cfg, qcfg, device)
    if found is None:
        log.info("note: dataset %s has no labels, so no classifier: sample-quality metrics skipped",
                 data_cfg.get("_target_", "?"))
        return None
    classifier, (_, _, x_test, _) = found
    if classifier.config["data_dim"] != model.data_dim:
        log.warning("the dataset's classifier takes %d inputs but the model makes %d: sample quality skipped",
                    classifier.config["data_dim"], model.data_dim)
        return None
    metric = hydra.utils.instantiate(qcfg.metric)(classifier).to(device)
    rows = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(int(qcfg.classifier.seed)))[:n]
    batch = int(qcfg.get("batch_size", 1000))
    with progress("sample quality", len(rows) + n, "images") as advance:
        for chunk in x_test[rows].split(batch):
            metric.update(chunk.to(device), real=True)
            advance(len(chunk))
        for start in range(0, n, batch):
            m = min(batch, n - start)
            if generate is not None:
                fake = generate(m)
            elif isinstance(model, LatentVariableModel):
                fake = model.model.sample(m, generator=generator, mean=qcfg.get("generated", "mean") == "mean")
            else:  # a denoiser
                fake = model.sample(m, generator=generator)
            metric.update(fake, real=False)
            advance(m)
    return metric.compute()


def train_classifier_only(cfg: DictConfig) -> dict[str, float]:
    """`latentlab-eval train_classifier=<dataset>`: train (or find cached) the dataset's classifier."""
    found = dataset_classifier(data_config_by_name(str(cfg.train_classifier), cfg), cfg.eval.quality)
    if found is None:
        raise ConfigError(f"dataset {cfg.train_classifier!r} has no labels: there is no classifier to train")
    acc = float(found[0].test_accuracy)
    print(f"{cfg.train_classifier} classifier: test accuracy {acc:.4f}")
    return {"test/classifier_acc": acc}


# --------------------------------------------------------------------------- posterior analyses


def first_test_batches(datamodule: L.LightningDataModule, n: int, batch_size: int,
                       device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """The first n test examples as (x, index) batches of `batch_size`, on `device`."""
    seen = 0
    for x, index in datamodule.test_dataloader():
        x, index = x[: n - seen], index[: n - seen]
        for xs, idx in zip(x.split(batch_size), index.split(batch_size), strict=True):
            yield xs.to(device), idx.to(device)
        seen += len(x)
        if seen >= n:
            return


def run_analyses(model: LatentVariableModel, datamodule: L.LightningDataModule, run_cfg: DictConfig, cfg: DictConfig,
                 plan: Analyses, out: Path, device: torch.device) -> tuple[dict[str, float], dict[str, Path]]:
    """Every analysis `plan` asks for: ({test/<name>: value}, {image key: png path}). BDMC and the gaps use the
    test pass's budget (`eval.nll`), so BDMC's gap bounds the error of the number reported as test/nll."""
    metrics: dict[str, float] = {}
    images: dict[str, Path] = {}
    seed = int(cfg.seed) if cfg.get("seed") is not None else 0

    def stream(analysis: int) -> torch.Generator:
        """Each analysis its own keyed stream: switching one on or off leaves the others' draws (and numbers) as they were."""
        return keyed_generator(seed, Stream.EVAL_ANALYSIS, analysis, device=device)

    if not isinstance(model, LatentVariableModel):  # a denoiser: no latent, no bound; its samples are judged
        plan = dataclasses.replace(plan, bdmc=0, gaps=0, posterior_plots=0)
    else:
        nll = model.nll_settings["test"]

    def timed(what: str, start: float) -> None:
        log.info("%s done in %.1f s", what, time.perf_counter() - start)

    images["samples"] = _sample_grid(model, out / "samples.png", stream(0))
    if plan.bdmc:
        t0 = time.perf_counter()
        metrics.update(bdmc_metrics(model, plan.bdmc, ais_from_settings(nll, n_chains=1), plan.batch_size, stream(1), nll))
        timed(f"BDMC on {plan.bdmc} simulated examples", t0)
    if plan.gaps:
        t0 = time.perf_counter()
        batches = first_test_batches(datamodule, plan.gaps, plan.batch_size, device)
        gaps = inference_gap_metrics(model, batches, plan.gap, nll, stream(2), total=plan.gaps)
        if gaps is None:
            log.info("note: %s's posterior has no bound of its own: inference gap skipped", model.method)
        else:
            metrics.update(gaps)
            if gaps.get("gap_local_not_converged", 0) > 0:
                log.warning("approximation gap: %d of %d examples' local Gaussians did not converge within "
                            "eval.gap.local_steps; raise it (or eval.gap.local_lr)", gaps["gap_local_not_converged"], plan.gaps)
            timed(f"inference gaps on {plan.gaps} test examples", t0)
    if plan.posterior_plots:
        if model.latent_dim == 2:
            x, index = next(first_test_batches(datamodule, plan.posterior_plots, plan.posterior_plots, device))
            pictures = posterior_pictures(model, x, index, plan.posterior_draws, plan.grid_limit, plan.grid_resolution,
                                          stream(3))
            images["posteriors"] = plot_posterior_pictures(out / "posteriors.png", pictures, x, model.image_shape,
                                                           title=f"{model.method}: exact vs method posterior")
        else:
            log.info("note: posterior pictures need a 2-d latent (this model has %d): skipped", model.latent_dim)
    if plan.samples:
        t0 = time.perf_counter()
        quality = sample_quality_metrics(model, run_cfg.data, cfg.eval.quality, plan.samples, stream(4))
        if quality is not None:
            metrics.update(quality)
            timed(f"sample quality of {plan.samples} samples", t0)
        prior_file = latent_prior.prior_path(str(cfg.ckpt_path))
        if quality is not None and isinstance(model, LatentVariableModel) and prior_file.is_file():
            t0 = time.perf_counter()  # the same metrics through the fitted latent prior (latentlab-sample task=fit_prior)
            prior = latent_prior.load(prior_file).to(device)
            generator = stream(5)
            learned = sample_quality_metrics(model, run_cfg.data, cfg.eval.quality, plan.samples, generator,
                                             lambda m: latent_prior.sample_latent_prior(model, prior, m, generator))
            metrics.update({f"latent_prior_{k}": v for k, v in (learned or {}).items() if k != "classifier_acc"})
            timed(f"sample quality of {plan.samples} samples through the learned latent prior ({prior_file.name})", t0)
    return {f"test/{k}": float(v) for k, v in metrics.items()}, images


def _sample_grid(model: LatentVariableModel, path: Path, generator: torch.Generator, n: int = 64) -> Path:
    from latentlab.callbacks.images import save_image_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(model.sample(n, generator=generator).cpu(), model.image_shape, path, nrow=8, title="samples")
    return path


def publish(loggers: list[Any], metrics: dict[str, float], extra: dict[str, float], images: dict[str, Path]) -> None:
    """Send the analyses' metrics to every logger; W&B also gets all metrics as the run summary, the
    pictures as images, and its run is finished (a multirun's next job starts a new one)."""
    for logger in loggers:
        if extra:
            logger.log_metrics(extra)
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.summary.update(metrics)
            for key, path in images.items():
                logger.log_image(key=key, images=[str(path)])
            logger.experiment.finish()
        else:
            logger.save()


# --------------------------------------------------------------------------- entry point


def data_dir_was_given(cfg: DictConfig) -> bool:
    """Whether `paths.data_dir` was chosen (an override or LATENTLAB_DATA_DIR) rather than left at its default;
    only then does it beat the data directory the run itself trained from."""
    def raw(node: DictConfig) -> Any:
        return OmegaConf.to_container(node, resolve=False).get("data_dir")  # type: ignore[union-attr]

    default = raw(OmegaConf.load(str(files("latentlab.conf").joinpath("paths", "default.yaml"))))
    return "LATENTLAB_DATA_DIR" in os.environ or (cfg.get("paths") is not None and raw(cfg.paths) != default)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate one checkpoint (see module doc); returns the numeric metrics it wrote to metrics.json."""
    validate_eval_config(cfg)
    data_dir_given = data_dir_was_given(cfg)
    resolve_paths(cfg)
    if cfg.get("train_classifier"):
        return train_classifier_only(cfg)
    plan = Analyses.from_config(cfg.get("eval"))
    nll = NLLSettings.coerce(_container(cfg.eval.nll) if cfg.get("eval") and cfg.eval.get("nll") else "standard")
    ckpt = load_checkpoint(cfg.ckpt_path)
    run_cfg = OmegaConf.create(ckpt["latentlab"]["config"])
    saved_dir = (run_cfg.get("paths") or {}).get("data_dir")
    if not data_dir_given and saved_dir and Path(saved_dir).is_dir():
        with open_dict(cfg):  # the classifier cache and the data follow the run's own directory
            cfg.paths.data_dir = saved_dir
        log.info("test data from the run's own data directory %s (paths.data_dir=... reads another)", saved_dir)
    with open_dict(run_cfg):
        run_cfg.paths.data_dir = cfg.paths.data_dir
        if "data_dir" in run_cfg.data:  # saved resolved at training time: point it here too
            run_cfg.data.data_dir = cfg.paths.data_dir
        if cfg.get("data_overrides"):
            run_cfg.data = OmegaConf.merge(run_cfg.data, cfg.data_overrides)
    if cfg.get("seed") is not None:  # said once the model has loaded: a refused run prints its error alone
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = build_datamodule(run_cfg)
    try:
        datamodule.prepare_data()
        datamodule.setup("test")
    except DataError as exc:  # the data config comes from the checkpoint: here it is changed through data_overrides
        raise DataError(str(exc).replace("data.download=true", "+data_overrides.download=true")) from None
    model = build_model(run_cfg, datamodule)
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {cfg.ckpt_path} does not match method {ckpt['latentlab']['method']!r} "
                              f"as this latentlab builds it (missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}); "
                              "was it written by another version?")
    model.on_load_checkpoint(ckpt)
    if isinstance(model, LatentVariableModel):  # the denoiser has no p(z), so no log p(x) budget
        model.configure_evaluation(test=nll, seed=cfg.get("seed"))
    loggers = build_loggers(cfg)
    # the test pass (AIS, the slow part) shows the same Rich progress as the analyses after it
    bar = [RichProgressBar()] if cfg.trainer.get("enable_progress_bar", True) else []
    trainer = build_trainer(cfg, bar, loggers)
    if cfg.get("seed") is not None:
        log.info("Seed set to %d", int(cfg.seed))
    trainer.test(model, datamodule=datamodule)
    metrics = scalar_metrics(trainer.callback_metrics)

    out = Path(cfg.paths.output_dir)
    device = trainer.strategy.root_device
    model.to(device).eval()
    extra, images = run_analyses(model, datamodule, run_cfg, cfg, plan, out, device)
    metrics.update(extra)
    record: dict[str, Any] = {**metrics, **model.evaluation_record("test"), "method": ckpt["latentlab"]["method"],
                              "ckpt_path": str(cfg.ckpt_path)}
    write_json_atomic(out / "metrics.json", record)
    (out / "metrics.md").write_text(metrics_markdown(record, title=f"{record['method']}: {out.name}"))
    publish(loggers, metrics, extra, images)
    log.info("metrics: %s", {k: round(v, 4) for k, v in sorted(metrics.items())})
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://latentlab.conf", config_name="eval")
@entry.job  # the one error path: one line + exit 2, a failing job of a multirun is reported and the sweep goes on
def _hydra_main(cfg: DictConfig) -> Any:
    return evaluate(cfg).get("test/nll")


def main(argv: Any = None) -> None:
    entry.run(_hydra_main, argv=argv)


if __name__ == "__main__":
    main()
