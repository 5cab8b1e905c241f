"""Tweedie's formula against closed forms, a trained denoiser's score, `data=gaussian_ring`, and `model=denoiser`."""

from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

from latentlab.builders import build_datamodule, build_model, compose_config
from latentlab.data.ring import GaussianMixture, GaussianRingDataModule, ring_mixture
from latentlab.errors import ConfigError
from latentlab.models.denoiser import NLL_NOT_AVAILABLE, fit_denoiser
from latentlab.nets.denoiser import tweedie_score
from trainers import quiet_trainer

MIXTURES = {
    "1d": GaussianMixture(torch.tensor([[-2.0], [0.5], [3.0]], dtype=torch.float64), torch.tensor([0.3, 1.0, 0.6]),
                          torch.tensor([0.2, 0.5, 0.3])),
    "2d": GaussianMixture(torch.tensor([[0.0, 0.0], [2.0, 1.0], [-1.0, 2.5]], dtype=torch.float64),
                          torch.tensor([0.4, 0.2, 0.7]), torch.tensor([0.5, 0.3, 0.2])),
    "ring": ring_mixture(),
}


def autograd_score(mix: GaussianMixture, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """grad log p_sigma(y) by autograd of the noised log-density: independent of the closed forms."""
    y = y.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(mix.log_prob(y, sigma).sum(), y)
    return grad


@pytest.mark.parametrize("name", sorted(MIXTURES))
@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0, 3.0])
def test_tweedie_with_the_exact_posterior_mean_is_the_exact_score(name: str, sigma: float) -> None:
    """(E[x|y] - y) / sigma^2 == grad log p_sigma(y) everywhere (float64 round-off), near and far from the data."""
    mix = MIXTURES[name]
    g = torch.Generator().manual_seed(0)
    y = torch.cat([mix.sample(200, g)[0] + sigma * torch.randn(200, mix.dim, generator=g, dtype=torch.float64),
                   4.0 * torch.randn(50, mix.dim, generator=g, dtype=torch.float64)])
    truth = autograd_score(mix, y, sigma)
    tweedie = tweedie_score(mix.posterior_mean(y, sigma), y, sigma)
    assert torch.allclose(tweedie, truth, rtol=1e-9, atol=1e-9)
    assert torch.allclose(mix.score(y, sigma), truth, rtol=1e-9, atol=1e-9)


def test_noised_mixture_is_a_density_and_the_mean_of_its_denoiser_is_the_data_mean() -> None:
    """log p_sigma integrates to 1 (1-d quadrature), and E_y[E[x|y]] = E[x] (tower rule)."""
    mix, sigma = MIXTURES["1d"], 0.4
    grid = torch.linspace(-8.0, 10.0, 20001, dtype=torch.float64).unsqueeze(-1)
    density = mix.log_prob(grid, sigma).exp().squeeze()
    assert float(torch.trapezoid(density, grid.squeeze())) == pytest.approx(1.0, abs=1e-8)
    mean = float(torch.trapezoid(density * mix.posterior_mean(grid, sigma).squeeze(), grid.squeeze()))
    assert mean == pytest.approx(float(mix.weights @ mix.means.squeeze()), abs=1e-8)


def test_trained_denoiser_score_matches_the_ring_score_on_held_out_points() -> None:
    """Denoising score matching on ring draws (3000 Adam steps, ~8 s); relative squared score error
    E||s_theta - s||^2 / E||s||^2 on fresh y ~ p_sigma: measured 0.01-0.03 for sigma >= 0.7 and
    0.13-0.25 below (small sigma asks D for precision ~sigma^2 times the score's accuracy)."""
    mix = ring_mixture()
    x_train = mix.sample(20000, torch.Generator().manual_seed(0))[0].float()
    model = fit_denoiser(x_train, steps=3000, sigma_max=2.0, sigma_min=0.05, n_levels=8)
    held_out = mix.sample(2000, torch.Generator().manual_seed(1))[0].float()
    for sigma in model.sigmas:
        y = held_out + sigma * torch.randn(held_out.shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            learned = model.score(y, sigma)
        true = mix.score(y.double(), sigma).float()
        rel = float((learned - true).square().sum(-1).mean() / true.square().sum(-1).mean())
        assert rel < (0.06 if sigma >= 0.6 else 0.4), f"sigma={sigma:.3f}: relative score error {rel:.3f}"


def test_gaussian_ring_data_module_draws_the_ring() -> None:
    dm = GaussianRingDataModule(num_train=4000, num_val=100, num_test=100)
    x, labels = dm.data("train"), dm.labels("train")
    assert x.shape == (4000, 2) and x.dtype == torch.float32
    assert torch.bincount(labels, minlength=8).float().div(4000).sub(1 / 8).abs().max() < 0.02
    assert (x.norm(dim=-1) - 2.0).abs().mean() < 0.1
    assert (dm.mixture.nearest_mode(x, 0.5) == labels).float().mean() > 0.999
    batch_x, index = next(iter(dm.train_dataloader()))
    assert batch_x.shape == (256, 2) and index.dtype == torch.int64
    with pytest.raises(ConfigError, match="data.weights"):
        GaussianRingDataModule(weights=[1.0, 2.0])


def test_denoiser_trains_logs_per_level_losses_and_says_nll_is_not_available(tmp_path, caplog) -> None:
    """model=denoiser through the real config: per-level validation losses, no test/nll number, one line
    saying why, and a checkpoint `latentlab-eval` can rebuild the model from."""
    cfg = compose_config(["model=denoiser", "data=gaussian_ring", "data.num_train=512", "data.num_val=128",
                          "data.num_test=128", "model.n_levels=3", "model.sampler.n_levels=3",
                          "model.sampler.n_steps=5"], output_dir=tmp_path)
    dm = build_datamodule(cfg)
    model = build_model(cfg, dm)
    trainer = quiet_trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert {"val/loss", "val/loss_level0", "val/loss_level2"} <= set(trainer.callback_metrics)
    with caplog.at_level(logging.INFO, logger="latentlab"):
        trainer.test(model, datamodule=dm, verbose=False)
    assert "test/nll" not in trainer.callback_metrics and "test/loss_level1" in trainer.callback_metrics
    assert [r.getMessage() for r in caplog.records].count(NLL_NOT_AVAILABLE) == 1
    path = tmp_path / "d.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["latentlab"]["method"] == "denoiser" and ckpt["latentlab"]["config"]["model"]["sigma_min"] == 0.01
    rebuilt = build_model(OmegaConf.create(ckpt["latentlab"]["config"]), dm)  # as latentlab-eval rebuilds it
    rebuilt.load_state_dict(ckpt["state_dict"])
    samples = rebuilt.sample(16, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (16, 2) and torch.isfinite(samples).all()


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_denoiser_net_is_the_identity_at_zero_noise_and_keeps_any_leading_shape(kind: str) -> None:
    """The preconditioning makes D(y, sigma -> 0) = y exactly in the limit, for either net kind."""
    from latentlab.nets import NetSpec
    from latentlab.nets.denoiser import NoiseConditionalDenoiser

    torch.manual_seed(0)
    net = NoiseConditionalDenoiser(NetSpec(kind=kind, hidden_dims=[32], channels=[8, 8]), 64, (1, 8, 8))
    y = torch.rand(3, 5, 64)
    assert net(y, torch.full((3, 5), 0.3)).shape == (3, 5, 64)
    assert torch.allclose(net(y, 1e-6), y, atol=1e-5)
