"""`model=denoiser`: a noise-conditional denoiser D(y, sigma) whose Tweedie score drives Langevin sampling.

Not a latent-variable model, so not a `LatentVariableModel`: there is no p(z), no decoder and no
tractable log p(x), and faking those hooks would let the evaluator print a number that means nothing.
What it shares with the latent methods is the Lightning life cycle, the optimiser factories, the
`sample(n, generator)` the image callbacks call, and the checkpoint metadata `latentlab-eval` reads.

Training (Song & Ermon 2019): sigma uniform on the geometric ladder sigma_1 > ... > sigma_L, y = x + sigma eps,
and the denoising score-matching loss with their weight lambda(sigma) = sigma^2,
sigma^2 * 1/2 ||s(y, sigma) + (y - x) / sigma^2||^2 = ||D(y, sigma) - x||^2 / (2 sigma^2), which is O(1) at
every level. Validation and test log it per level (`val/loss_level{i}`, i = 0 the largest sigma) on
fixed noise, and its mean over levels (`val/loss`). `test/nll` is not available; the test pass says so.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

import latentlab
from latentlab.errors import ConfigError
from latentlab.models.base import (LeanLightningModule, OptimizerFactory, SchedulerFactory, check_optimizer_factory,
                                   float32_evaluation)
from latentlab.nets import NetSpec
from latentlab.optim import lightning_optimizers
from latentlab.nets.denoiser import NoiseConditionalDenoiser, tweedie_score
from latentlab.rng import seeded_global_rng
from latentlab.samplers.score import AlphaMixingLangevin, ScoreAnnealedLangevin, ScoreSampler, geometric_levels

log = logging.getLogger("latentlab")
NLL_NOT_AVAILABLE = ("test/nll: not available for model=denoiser (a denoiser gives a score, not a tractable "
                     "likelihood); judge it by sample quality, latentlab-eval eval.samples=N")


class Denoiser(LeanLightningModule):
    """D_theta(y, sigma) on flat data (batch, data_dim); `score(y, sigma)` is Tweedie's, `sample` runs `sampler`."""

    method = "denoiser"

    def __init__(
        self,
        data_dim: int,
        image_shape: Sequence[int] | None = None,
        net: NetSpec | Mapping[str, Any] | None = None,
        sigma_max: float = 1.0,
        sigma_min: float = 0.01,
        n_levels: int = 10,
        sigma_data: float = 0.5,
        sampler: ScoreSampler | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        if int(data_dim) <= 0:
            raise ConfigError(f"data_dim must be a positive integer, got {data_dim}")
        if sampler is not None and not isinstance(sampler, ScoreSampler):
            raise ConfigError(f"model.sampler must be a score sampler (sampler@model.sampler=score_annealed|score_ula|"
                              f"score_alpha), got {type(sampler).__name__}")
        self.data_dim = int(data_dim)
        self.image_shape = tuple(int(s) for s in image_shape) if image_shape is not None else None
        self.net_spec = NetSpec.coerce(net)
        self.sigmas = geometric_levels(float(sigma_max), float(sigma_min), int(n_levels))
        self.denoiser = NoiseConditionalDenoiser(self.net_spec, self.data_dim, self.image_shape, sigma_data)
        self.register_buffer("sigma_ladder", torch.tensor(self.sigmas), persistent=False)
        self.sampler = sampler or ScoreAnnealedLangevin(step_size=2e-5 * (self.sigmas[-1] / 0.01) ** 2, n_steps=50,
                                                        levels=self.sigmas, final_denoise=True)
        self.optimizer_factory = optimizer or torch.optim.Adam
        self.scheduler_factory = scheduler
        check_optimizer_factory(self.optimizer_factory)
        self.run_config: dict[str, Any] | None = None  # the resolved Hydra config, saved in checkpoints

    # ----- the score ----------------------------------------------------------------------------
    def forward(self, y: Tensor, sigma: float | Tensor) -> Tensor:
        return self.denoiser(y, sigma)

    def score(self, y: Tensor, sigma: float | Tensor) -> Tensor:
        """grad_y log p_sigma(y) ~ (D(y, sigma) - y) / sigma^2 (Tweedie)."""
        return tweedie_score(self.denoiser(y, sigma), y, sigma)

    def components(self) -> dict[str, torch.nn.Module]:
        return {"denoiser": self.denoiser}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, sampler: ScoreSampler | None = None,
               measurement: Any = None, x0: Tensor | None = None) -> Tensor:
        """n samples (n, data_dim) by Langevin with this score, from N(0, s^2 I): s = 1 for the alpha
        variant, else max(1, sigma_1) of the sampler (its noised density at sigma_1 is about that wide)."""
        sampler = sampler or self.sampler
        if x0 is None:
            width = 1.0 if isinstance(sampler, AlphaMixingLangevin) else max(1.0, sampler.schedule()[0][0])
            device = generator.device if generator is not None else self.device
            x0 = width * torch.randn(n, self.data_dim, generator=generator, device=device)
        return sampler.sample(self.score, x0.to(self.device), generator, measurement=measurement).z

    def reconstruct(self, x: Tensor, index: Tensor | None = None) -> None:
        """No encoder, no reconstructions (the image callback skips them)."""
        return None

    # ----- the loss -----------------------------------------------------------------------------
    def denoising_loss(self, x: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
        """Per example ||D(x + sigma eps, sigma) - x||^2 / (2 sigma^2), (batch,)."""
        y = x + sigma.unsqueeze(-1) * noise
        return (self.denoiser(y, sigma) - x).square().sum(-1) / (2.0 * sigma.square())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, _ = batch
        level = torch.randint(len(self.sigmas), (x.shape[0],), device=x.device)
        loss = self.denoising_loss(x, self.sigma_ladder[level], torch.randn_like(x)).mean()
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> None:
        """Every level on the same fixed noise (keyed on the batch), so curves compare across epochs; in float32
        under any `*-mixed` training precision (`float32_evaluation`)."""
        x, _ = batch
        generator = torch.Generator(x.device).manual_seed(10_000 + batch_idx)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        with float32_evaluation(x):
            losses = [self.denoising_loss(x, torch.full_like(x[:, 0], s), noise).mean() for s in self.sigmas]
        for i, value in enumerate(losses):
            self.log(f"{stage}/loss_level{i}", value, on_epoch=True, batch_size=x.shape[0], sync_dist=True)
        self.log(f"{stage}/loss", torch.stack(losses).mean(), on_epoch=True, batch_size=x.shape[0], sync_dist=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        if self.trainer.is_global_zero:
            log.info(NLL_NOT_AVAILABLE)

    # ----- what latentlab-eval asks of every method ------------------------------------------------
    def configure_evaluation(self, val: Any = None, test: Any = None, seed: int | None = None) -> None:
        """The evaluator's log p(x) budgets have nothing to estimate here; only the seed is kept."""
        if seed is not None:
            self.eval_seed = int(seed)

    def evaluation_record(self, stage: str = "test") -> dict[str, str]:
        """How `stage/nll` was obtained, for metrics.json: here, that it was not (a string, never a number)."""
        return {f"{stage}/nll_estimator": "not available (a denoiser has no tractable likelihood)"}

    # ----- optimisation and checkpoints ---------------------------------------------------------
    def configure_optimizers(self) -> Any:
        return lightning_optimizers(self.optimizer_factory, self.scheduler_factory, self.parameters())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The same metadata as the latent methods write, so `latentlab-eval` can rebuild it."""
        checkpoint["latentlab"] = {"method": self.method, "version": latentlab.__version__, "config": self.run_config}


@torch.enable_grad()  # it trains, whatever the caller's grad mode (latentlab-sample runs under no_grad)
def fit_denoiser(points: Tensor, steps: int = 3000, batch_size: int = 512, lr: float = 3e-3, n_levels: int = 8,
                 sigma_max: float | None = None, sigma_min: float | None = None, net: Mapping[str, Any] | None = None,
                 seed: int = 0, sampler: ScoreSampler | None = None) -> Denoiser:
    """A `Denoiser` fitted to a point cloud (N, d) without a Trainer: Adam with a one-cycle schedule.

    For small problems where a Lightning run is overhead: the ring in tests and notebooks, and the latent
    prior of a latent model (fitted to its aggregate posterior). Defaults from the data: sigma_max the
    largest distance between points (of a 1000-point subset; Song & Ermon's technique 1), sigma_min 1% of
    the data's std, sigma_data its std.
    """
    generator = torch.Generator().manual_seed(int(seed))
    points = points.detach().float().cpu()
    subset = points[torch.randperm(len(points), generator=generator)[:1000]]
    std = float(points.std())
    sigma_max = float(torch.cdist(subset, subset).max()) if sigma_max is None else float(sigma_max)
    sigma_min = 0.01 * std if sigma_min is None else float(sigma_min)
    with seeded_global_rng(int(seed)):
        model = Denoiser(data_dim=points.shape[1], net=net or {"hidden_dims": [128, 128], "activation": "silu"},
                         sigma_max=sigma_max, sigma_min=sigma_min, n_levels=n_levels, sigma_data=std, sampler=sampler)
    opt = torch.optim.Adam(model.parameters(), lr=lr / 1.5)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=int(steps))
    for _ in range(int(steps)):
        x = points[torch.randint(len(points), (batch_size,), generator=generator)]
        level = torch.randint(len(model.sigmas), (batch_size,), generator=generator)
        noise = torch.randn(x.shape, generator=generator)
        loss = model.denoising_loss(x, model.sigma_ladder[level], noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return model.eval()
