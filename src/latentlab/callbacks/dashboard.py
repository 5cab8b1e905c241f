"""Dashboard extras for W&B and TensorBoard, and a progress bar / model summary that name the method.

`Dashboard` adds, for any latentlab method, what the scalar logs do not show:

- the run's method and phase plan in the W&B config and tags, `val/nll` tracked as its minimum;
- per-epoch means of every per-step training metric (`train/loss_epoch`, `train/disc_acc_epoch`, ...), next to the
  per-step values Lightning already logs (a step curve is noisy, an epoch curve compares runs);
- a 2-d scatter of posterior means of training examples coloured by their label (the latent itself when it is
  2-d, else its first two principal components), every `every_n_epochs` validation epochs;
- histograms of the Langevin diagnostics of ALMOND's E-steps over the epoch (step size, acceptance rate, gradient
  norm; with MALA also the per-chain adapted step sizes);
- after testing, the evaluation table (`test/*` metrics with their standard errors) as a `wandb.Table` and as a
  TensorBoard text table, and TensorBoard's HParams tab: the run's config beside its final metrics.

`logger=wandb` and `logger=tensorboard` add it (`callbacks.dashboard=null` removes it; conf/callbacks/dashboard.yaml
lists its settings). It draws from no random stream training uses: its hooks run under `private_rng` and its own
draws come from a generator seeded with `seed`, so a run's numbers are the same with and without it.

Pictures go to every logger that takes images (W&B, TensorBoard), and to `<run dir>/latent_scatter.png`. Sample and
reconstruction grids come from `latentlab.callbacks.ImageGrid` (its `every_n_epochs` for grids during training).
Everything is written by rank 0 only and works with W&B offline (`wandb sync <run dir>/wandb/offline-run-*` later).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from latentlab.callbacks.images import is_logger, private_rng
from latentlab.errors import ConfigError
from latentlab.progress import reroute_logging, restore_logging

log = logging.getLogger("latentlab")

#: Per-step ALMOND E-step diagnostics (`train/<name>`) that become histograms at the end of each epoch.
LANGEVIN_DIAGNOSTICS = ("step_size", "accept_rate", "grad_norm")


# --------------------------------------------------------------------------- what is running


def method_phase(pl_module: Any) -> str | None:
    """The training phase of a method that has several (ALMOND: VAE warm-up, then Langevin EM), else None."""
    if not hasattr(pl_module, "in_vae_phase"):
        return None
    return "VAE warm-up" if pl_module.in_vae_phase else "Langevin EM"


def method_plan(pl_module: Any, max_epochs: int | None = None) -> str:
    """One line saying which method trains and how: e.g. "ALMOND: VAE warm-up for epochs 0-4, then Langevin EM ..."."""
    name = type(pl_module).__name__
    doc = (type(pl_module).__doc__ or "").strip().splitlines()
    head = f"{name} ({getattr(pl_module, 'method', '?')}): {doc[0].rstrip('.') if doc else ''}"
    if hasattr(pl_module, "in_vae_phase"):
        warm = int(getattr(pl_module, "vae_epochs", 0))
        sampler = getattr(pl_module, "sampler", None)  # the sampler group's object, else the older attributes
        n_steps = getattr(sampler, "n_steps", getattr(pl_module, "langevin_steps", "?"))
        kind = type(sampler).__name__ if sampler is not None and not isinstance(sampler, str) \
            else str(getattr(pl_module, "sampler_kind", sampler or "?"))
        steps = f"{pl_module.n_chains} chains x {n_steps} {kind.upper()} steps"
        langevin = f"Langevin EM ({steps} per E-step)"
        head += f". Phases: VAE warm-up for epochs 0-{warm - 1}, then {langevin}" if warm else f". Phase: {langevin}"
        if max_epochs is not None and warm >= max_epochs:
            head += f" (note: trainer.max_epochs={max_epochs} ends inside the warm-up)"
    elif getattr(pl_module, "adaptive_contrast", None) is not None:
        head += f". Adaptive contrast: {'on' if pl_module.adaptive_contrast else 'off'}, " \
                f"{pl_module.disc_steps} discriminator step(s) per model step"
    return head


class MethodProgressBar(RichProgressBar):
    """Rich progress bar that also shows the method, for multi-phase methods the phase in words (instead
    of ALMOND's numeric `train/phase`) and the latest validation NLL; log messages written while it is
    live (e.g. ALMOND's "starts the Langevin phase") print above it, not into it.

    Within an epoch the metrics column is refreshed at most every `metrics_interval_s` (and at its last
    batch): Lightning gathers the metrics after every batch, 0.25 ms a step, 1.5% of an MNIST VAE step,
    for a column nobody reads 50 times a second. The bar itself still advances every batch.

    It redraws at most `refresh_rate` (10) times a second, tqdm's pace, rather than Lightning's 100: Rich redraws
    from a thread of its own, and in a terminal one redraw costs ~0.8 ms of Python holding the GIL: at the
    MNIST VAE's ~80 batches a second on two cores that was 11% of a step drawing into /dev/null and 13% through a
    pseudo-terminal; at 10 a second, 2-3.5% (2026-12-07, side by side in one process; README, Benchmarks).
    """

    def __init__(self, *args: Any, refresh_rate: int = 10, metrics_interval_s: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, refresh_rate=refresh_rate, **kwargs)
        self.metrics_interval_s = float(metrics_interval_s)
        self._metrics_time = -float("inf")
        self._skip_metrics = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        last = batch_idx + 1 >= (trainer.num_training_batches or 0)
        self._skip_metrics = not last and time.monotonic() - self._metrics_time < self.metrics_interval_s
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._skip_metrics = False

    def _update_metrics(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._skip_metrics:
            return
        self._metrics_time = time.monotonic()
        super()._update_metrics(trainer, pl_module)

    def get_metrics(self, trainer: L.Trainer, pl_module: Any) -> dict[str, int | str | float | dict[str, float]]:
        items = dict(super().get_metrics(trainer, pl_module))
        items.pop("train/phase", None)
        items.pop("v_num", None)
        items = {"method": getattr(pl_module, "method", type(pl_module).__name__), **items}
        phase = method_phase(pl_module)
        if phase is not None:
            items["phase"] = phase
        if "val/nll" in trainer.callback_metrics and "val/nll" not in items:
            items["val/nll"] = round(float(trainer.callback_metrics["val/nll"]), 3)
        return items

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        self._rerouted = reroute_logging(getattr(self, "_rerouted", None))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._rerouted = reroute_logging(getattr(self, "_rerouted", None))

    def teardown(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        restore_logging(getattr(self, "_rerouted", []))
        super().teardown(trainer, pl_module, stage)


class MethodModelSummary(RichModelSummary):
    """Rich model summary headed by the method and its phase plan (which parts train when)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.is_global_zero and self._max_depth:  # printed beside the summary table, as Lightning prints it
            from rich import get_console

            get_console().print(method_plan(pl_module, trainer.max_epochs))
        super().on_fit_start(trainer, pl_module)


# --------------------------------------------------------------------------- logging helpers


def _loggers(trainer: L.Trainer, kind: str) -> list[Any]:
    return [lg for lg in trainer.loggers if is_logger(lg, kind)]


def figure_to_array(fig: Figure) -> np.ndarray:
    """A matplotlib figure as an RGB uint8 array (H, W, 3), drawn by Agg without pyplot: no global backend
    switch, so a notebook's inline plots keep working."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_picture(trainer: L.Trainer, key: str, rgb: np.ndarray, step: int, caption: str = "") -> None:
    """An RGB picture (H, W, 3) to W&B (as an image) and TensorBoard (as an HWC image)."""
    for logger in _loggers(trainer, "WandbLogger"):
        logger.log_image(key=key, images=[rgb], step=step, **({"caption": [caption]} if caption else {}))
    for logger in _loggers(trainer, "TensorBoardLogger"):
        logger.experiment.add_image(key, rgb, global_step=step, dataformats="HWC")


def log_histogram(trainer: L.Trainer, key: str, values: np.ndarray, step: int) -> None:
    """A sample of values as a histogram in W&B and TensorBoard."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return
    for logger in _loggers(trainer, "WandbLogger"):
        import wandb

        logger.experiment.log({key: wandb.Histogram(values), "trainer/global_step": step})
    for logger in _loggers(trainer, "TensorBoardLogger"):
        logger.experiment.add_histogram(key, values, global_step=step)


def project_2d(z: Tensor) -> tuple[Tensor, tuple[str, str]]:
    """(n, d) -> (n, 2): the latent itself for d <= 2, else its first two principal components."""
    if z.shape[1] == 1:
        return torch.cat([z, torch.zeros_like(z)], 1), ("z1", "")
    if z.shape[1] == 2:
        return z, ("z1", "z2")
    centred = z - z.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:2].T, ("PC1", "PC2")


@torch.no_grad()
def posterior_means(pl_module: Any, x: Tensor, index: Tensor, n_draws: int = 16,
                    generator: torch.Generator | None = None) -> Tensor | None:
    """Where examples sit in z: ALMOND's mean over its persistent chains (as in the paper's figure), an
    amortized Gaussian's mean, else the mean of `n_draws` posterior draws (AVB's implicit q) from
    `generator`; None for a method without a posterior over z (the denoiser)."""
    chains = getattr(pl_module, "chains", None)
    if chains is not None and bool(pl_module.visited[index].all()):
        return pl_module.chain_states(index).mean(0)
    try:
        posterior = pl_module.posterior(x, index)
    except NotImplementedError:
        return None
    gaussian = posterior.gaussian()
    return gaussian[0] if gaussian is not None else posterior.sample(n_draws, generator).mean(0)


# --------------------------------------------------------------------------- the callback


class Dashboard(L.Callback):
    """W&B/TensorBoard extras (see the module doc). `output_dir`: where `latent_scatter.png` goes (None: not saved);
    `every_n_epochs`: latent scatter cadence (0: only at the end of training); `max_points`: training examples in it;
    `epoch_means`/`histograms`/`eval_table`: switch those parts off; `seed`: of the scatter's own draws."""

    def __init__(self, output_dir: str | None = None, every_n_epochs: int = 1, max_points: int = 2000,
                 epoch_means: bool = True, histograms: bool = True, eval_table: bool = True, seed: int = 0) -> None:
        if every_n_epochs < 0 or max_points < 1:
            raise ConfigError(f"Dashboard needs every_n_epochs >= 0 and max_points >= 1, got {every_n_epochs}, {max_points}")
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.every_n_epochs, self.max_points = int(every_n_epochs), int(max_points)
        self.epoch_means, self.histograms, self.eval_table, self.seed = epoch_means, histograms, eval_table, int(seed)
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)
        self._diagnostics: dict[str, list[float]] = defaultdict(list)
        self._seen: dict[str, Any] = {}  # the last value object per key: callback_metrics keeps stale ones
        self._final: dict[str, float] = {}

    # ----- run metadata
    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        method = getattr(pl_module, "method", type(pl_module).__name__)
        for logger in _loggers(trainer, "WandbLogger"):
            run = logger.experiment
            run.config.update({"method": method, "method_plan": method_plan(pl_module, trainer.max_epochs)},
                              allow_val_change=True)
            run.tags = tuple(dict.fromkeys([*(run.tags or ()), method]))
            run.define_metric("val/nll", summary="min")
            run.define_metric("val/elbo", summary="max")
        for logger in _loggers(trainer, "TensorBoardLogger"):
            logger.experiment.add_text("method", method_plan(pl_module, trainer.max_epochs), global_step=0)

    # ----- per-epoch means and Langevin diagnostics
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        size = int(batch[0].shape[0]) if isinstance(batch, (tuple, list)) else 1
        for key, tensor in trainer.callback_metrics.items():
            # a key not logged in this step (ALMOND's warm-up `train/elbo` in its Langevin phase) still holds
            # its last value, the same object: count each logged value once
            if not key.startswith("train/") or key.endswith("_epoch") or self._seen.get(key) is tensor:
                continue
            self._seen[key] = tensor
            value = float(tensor)
            if self.epoch_means:
                self._sums[key] += value * size
                self._counts[key] += size
            name = key.split("/", 1)[1]
            if self.histograms and name in LANGEVIN_DIAGNOSTICS and hasattr(pl_module, "in_vae_phase") \
                    and not pl_module.in_vae_phase:
                self._diagnostics[name].append(value)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        for key, total in self._sums.items():
            pl_module.log(f"{key}_epoch", total / max(1, self._counts[key]), on_step=False, on_epoch=True,
                          sync_dist=True)
        self._sums.clear()
        self._counts.clear()
        if trainer.is_global_zero and self._diagnostics:
            for name, values in self._diagnostics.items():
                log_histogram(trainer, f"langevin/{name}", np.array(values), trainer.global_step)
            chain_steps = getattr(pl_module, "chain_step_sizes", None)  # MALA's per-chain adapted step sizes
            visited = getattr(pl_module, "visited", None)
            if chain_steps is not None and visited is not None and bool(visited.any()):
                log_histogram(trainer, "langevin/chain_step_size", chain_steps[:, visited].cpu().numpy(),
                              trainer.global_step)
        self._diagnostics.clear()

    # ----- latent scatter
    def latent_scatter(self, trainer: L.Trainer, pl_module: Any) -> np.ndarray | None:
        """The scatter picture (RGB array) of up to `max_points` training examples, or None when impossible."""
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "data"):
            return None
        x_all = datamodule.data("train")
        n = min(self.max_points, x_all.shape[0])
        was_training = pl_module.training
        pl_module.eval()
        points = []
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        try:
            for start in range(0, n, 500):
                index = torch.arange(start, min(start + 500, n), device=pl_module.device)
                z = posterior_means(pl_module, x_all[start:start + len(index)].to(pl_module.device), index,
                                    generator=generator)
                if z is None:
                    return None
                points.append(z.float().cpu())
        finally:
            pl_module.train(was_training)
        xy, (xlabel, ylabel) = project_2d(torch.cat(points))
        labels = datamodule.labels("train") if hasattr(datamodule, "labels") else None
        fig = Figure(figsize=(6, 5))
        ax = fig.subplots()
        colour = None if labels is None else labels[:n].numpy()
        scatter = ax.scatter(xy[:, 0].numpy(), xy[:, 1].numpy(), c=colour, s=4, cmap="tab10" if labels is not None else None)
        if labels is not None:
            fig.colorbar(scatter, ax=ax, label="label")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        phase = method_phase(pl_module)
        ax.set_title(f"{getattr(pl_module, 'method', '')}{f' ({phase})' if phase else ''}: posterior means, "
                     f"epoch {trainer.current_epoch}")
        rgb = figure_to_array(fig)
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            fig.savefig(self.output_dir / "latent_scatter.png", bbox_inches="tight", dpi=100)
        return rgb

    def _scatter(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        with private_rng([pl_module.device]):
            rgb = self.latent_scatter(trainer, pl_module)
        if rgb is not None:
            log_picture(trainer, "latents/scatter", rgb, trainer.global_step, f"epoch {trainer.current_epoch}")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or not self.every_n_epochs:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._scatter(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        # the test stage starts with fresh callback_metrics: keep the final validation ones for the HParams tab
        self._final = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        if not self.every_n_epochs:
            self._scatter(trainer, pl_module)

    # ----- the evaluation table and the HParams tab
    def on_test_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        final = {**self._final, **{k: float(v) for k, v in trainer.callback_metrics.items()
                                   if k.startswith(("val/", "test/")) and v.numel() == 1}}
        for logger in _loggers(trainer, "TensorBoardLogger"):
            log_hparams(logger, getattr(pl_module, "run_config", None) or {}, final)
        if not self.eval_table:
            return
        metrics = {k: v for k, v in final.items() if k.startswith("test/")}
        rows = [[key, value, metrics.get(f"{key}_se")] for key, value in sorted(metrics.items())
                if not (key.endswith("_se") and key[:-3] in metrics)]
        method = getattr(pl_module, "method", "")
        for logger in _loggers(trainer, "WandbLogger"):
            logger.log_table(key="evaluation", columns=["metric", "value", "se"], data=rows)
            logger.experiment.summary.update({**metrics, "method": method})
        if _loggers(trainer, "TensorBoardLogger"):
            from latentlab.compare import comparison_table

            table = comparison_table({method or "run": metrics})
            for logger in _loggers(trainer, "TensorBoardLogger"):
                logger.experiment.add_text("evaluation", table, global_step=trainer.global_step)


def log_hparams(logger: Any, params: dict[str, Any], metrics: dict[str, float]) -> None:
    """TensorBoard's HParams tab: the flattened config beside the final metrics. The metric entries point at
    the scalars already logged under the same tags (unlike `log_hyperparams(params, metrics)`, which would log
    each metric again at step 0)."""
    if not metrics:
        return
    from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
    from torch.utils.tensorboard.summary import hparams

    flat = logger._sanitize_params(_flatten_dict(_convert_params(params)))
    flat = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat.items()}
    writer = logger.experiment._get_file_writer()
    for summary in hparams(flat, metrics):
        writer.add_summary(summary)
