"""AVB: the discriminator learns log q - log p, adaptive contrast has the right moments, the grid
quadrature is exact, AVB beats the VAE on the paper's 4-point toy, and the app trains AVB on MNIST.

Tolerances come from the maths: Wald statistics of the logistic-regression MLE against chi-square
quantiles, k standard errors of Monte Carlo means and variances, quadrature truncation bounds.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from scipy import stats
from torch import Tensor, nn

from latentlab.analytic import LinearGaussian
from latentlab.data import AVBToyDataModule
from latentlab.errors import ConfigError
from latentlab.metrics.grid import PosteriorGrid, grid_log_likelihood, grid_posterior
from latentlab.models import AVB, VAE
from latentlab.nets import NetSpec
from latentlab.nets.avb import (
    BasisImplicitEncoder,
    ImplicitEncoderSpec,
    InnerProductDiscriminator,
    MLPDiscriminator,
    ResidualDiscriminator,
    discriminator_loss,
)
from trainers import quiet_trainer

LOG_QUARTER = math.log(0.25)


# ----------------------------------------------------------------------------- discriminator


def gaussian_pairs(n: int, means: Tensor, scale: float, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x uniform over the one-hot rows; z_q ~ q(z|x) = N(means[x], scale^2 I); z_p ~ p = N(0, I) with its own x."""
    k, d = means.shape
    xq, xp = torch.randint(0, k, (n,), generator=g), torch.randint(0, k, (n,), generator=g)
    z_q = means[xq] + scale * torch.randn(n, d, generator=g)
    z_p = torch.randn(n, d, generator=g)
    eye = torch.eye(k)
    return eye[xq], z_q, eye[xp], z_p


def true_log_ratio(x: Tensor, z: Tensor, means: Tensor, scale: float) -> Tensor:
    """log N(z; mu(x), scale^2 I) - log N(z; 0, I)."""
    mu = x @ means
    d = z.shape[-1]
    return (-0.5 * (z - mu).pow(2).sum(-1) / scale**2 - d * math.log(scale)) + 0.5 * z.pow(2).sum(-1)


def test_inner_product_discriminator_is_the_logistic_mle_at_the_parametric_rate() -> None:
    """With q(z|x) = N(M x, I), the log-ratio M x . z - |M x|^2 / 2 is exactly an inner-product
    discriminator with linear nets (x one-hot: any function of x is linear in x). Minimising the
    logistic loss on n + n samples is then logistic regression on the 12 identified coordinates
    (c_k = T(x_k, 0), C_k = grad_z T(x_k, .)), whose MLE is asymptotically N(truth, I^{-1} / 2n) with I
    the Fisher information; the Wald statistic is chi-square with 12 degrees of freedom (conservative
    for the per-x offsets under the balanced design). We require it below the 99.9% quantile."""
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.5], [0.3, -1.2]])
    n = 4000
    xq, zq, xp, zp = gaussian_pairs(n, means, 1.0, g)
    torch.manual_seed(0)
    disc = InnerProductDiscriminator(4, 2, hidden_dims=[], embed_dim=2, prior_term=False)
    opt = torch.optim.LBFGS(disc.parameters(), lr=1.0, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = discriminator_loss(disc(xq, zq), disc(xp, zp))
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)

    eye, origin, units = torch.eye(4), torch.zeros(4, 2), torch.eye(2)
    with torch.no_grad():
        c = disc(eye, origin)
        slopes = torch.stack([disc(eye, units[j].expand(4, 2)) - c for j in range(2)], dim=-1)  # (4, 2)
    beta_hat = torch.cat([slopes.reshape(-1), c]).double()
    beta_true = torch.cat([means.reshape(-1), -0.5 * means.pow(2).sum(-1)]).double()

    # Fisher information of the 12-coordinate logistic model under the sampling mixture (1/2 q + 1/2 p)
    gi = torch.Generator().manual_seed(1)
    xq2, zq2, xp2, zp2 = gaussian_pairs(200_000, means, 1.0, gi)
    x_all, z_all = torch.cat([xq2, xp2]).double(), torch.cat([zq2, zp2]).double()
    features = torch.cat([(x_all[:, :, None] * z_all[:, None, :]).reshape(-1, 8), x_all], dim=1)
    t = features @ beta_true
    w = torch.sigmoid(t) * torch.sigmoid(-t)
    fisher = (features * w[:, None]).T @ features / features.shape[0]
    diff = beta_hat - beta_true
    wald = float(2 * n * diff @ fisher @ diff)
    assert wald < stats.chi2.ppf(0.999, df=12), (wald, diff)
    # and the KL estimate E_q[T] per x is within 4 of its delta-method standard errors of |M x|^2 / 2
    cov = torch.linalg.inv(fisher) / (2 * n)
    for k in range(4):
        grad = torch.zeros(12, dtype=torch.float64)
        grad[2 * k: 2 * k + 2] = means[k].double()
        grad[8 + k] = 1.0
        kl_hat, kl = float(grad @ beta_hat), 0.5 * float(means[k].pow(2).sum())
        assert abs(kl_hat - kl) < 4 * math.sqrt(float(grad @ cov @ grad)), (k, kl_hat, kl)


@pytest.mark.parametrize("kind", ["mlp", "inner_product", "residual"])
def test_trained_discriminator_approaches_the_gaussian_log_ratio(kind: str) -> None:
    """q(z|x) = N(mu(x), 0.5^2 I) vs p = N(0, I): a non-linear log-ratio the networks must learn.

    Trained on fresh draws (512k per class), T's KL estimate E_q[T(x, z)] per x must match the
    closed-form KL(q(.|x) || p) = 1.76 within 4 Monte Carlo standard errors of the evaluation mean
    plus 0.15 nats. The statistical part is derived; the 0.15 is a stated budget (under 10% of the KL)
    for what a 64-unit network and 1000 Adam steps leave, which the sample size no longer bounds."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    means, scale = torch.tensor([[1.5, 0.0], [0.0, 1.5], [-1.5, 0.0], [0.0, -1.5]]), 0.5
    if kind == "mlp":
        disc: nn.Module = MLPDiscriminator(4, 2, hidden_dims=[64, 64], act="elu")
    elif kind == "residual":
        disc = ResidualDiscriminator(4, 2, width=64, blocks=2, act="elu")
    else:
        disc = InnerProductDiscriminator(4, 2, hidden_dims=[64, 64], act="elu", embed_dim=32)
    steps = 1000
    opt = torch.optim.Adam(disc.parameters(), lr=3e-3)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)  # the last iterate, not SGD noise
    for _ in range(steps):
        xq, zq, xp, zp = gaussian_pairs(512, means, scale, g)
        loss = discriminator_loss(disc(xq, zq), disc(xp, zp))
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    kl_true = 0.5 * 2 * (scale**2 - 1 - 2 * math.log(scale)) + 0.5 * means.pow(2).sum(-1)  # (4,)
    n_eval = 4096
    with torch.no_grad():
        for k in range(4):
            x = torch.eye(4)[k].expand(n_eval, 4)
            z = means[k] + scale * torch.randn(n_eval, 2, generator=g)
            t = disc(x, z)
            se = float(t.std()) / math.sqrt(n_eval)
            assert abs(float(t.mean()) - float(kl_true[k])) < 4 * se + 0.15, (kind, k, float(t.mean()), float(kl_true[k]))
            # pointwise too: on q's samples T tracks the log-ratio (which varies with sd ~1 nat) to ~0.25 nats
            err = (t - true_log_ratio(x, z, means, scale)).pow(2).mean().sqrt()
            assert float(err) < 0.25, (kind, k, float(err))


# ----------------------------------------------------------------------------- adaptive contrast


def linear_basis_encoder(min_draws: int) -> BasisImplicitEncoder:
    """v_i(eps) = eps W_i + b_i (no hidden layers): Gaussian, with E v_i = b_i, Var v_ij = sum_k W_i[k, j]^2."""
    torch.manual_seed(0)
    spec = ImplicitEncoderSpec(kind="basis", noise_dim=3, n_basis=4, basis_hidden=[], min_moment_draws=min_draws)
    enc = BasisImplicitEncoder(NetSpec(hidden_dims=[16]), data_dim=5, latent_dim=2, spec=spec)
    with torch.no_grad():  # push a_i(x) = elu(. - 5) + 1 into its linear range so the scales are O(1)
        enc.trunk[-1].bias[2:] += 5.0
    return enc


def analytic_moments(enc: BasisImplicitEncoder, x: Tensor) -> tuple[Tensor, Tensor]:
    z0, a = enc.coefficients(x)
    w, b = enc.basis.weights[0], enc.basis.biases[0][:, 0]  # (K, noise, d), (K, d)
    return z0 + (a * b).sum(1), (a.pow(2) * w.pow(2).sum(1)).sum(1)


def test_basis_encoder_monte_carlo_moments_match_the_analytic_ones() -> None:
    """The encoder's moment estimates from n noise draws: the mean has variance Var[z|x] / n and, the
    v_i being Gaussian here, the variance estimate sum_i a_i^2 s_i^2 has variance sum_i a_i^4 2 sigma_i^4 / (n-1).
    Both must lie within 4 of those standard errors of the closed form; and z itself, drawn many
    times for one x, must have that mean and variance."""
    n = 4000
    enc = linear_basis_encoder(n)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.manual_seed(3)
        draw = enc(x, num_samples=1)
        mean, var = analytic_moments(enc, x)
        _, a = enc.coefficients(x)
        sigma2 = enc.basis.weights[0].pow(2).sum(1)  # (K, d)
        var_se = (2 * (a.pow(4) * sigma2.pow(2)).sum(1) / (n - 1)).sqrt()
        assert ((draw.mean - mean).abs() < 4 * (var / n).sqrt()).all()
        assert ((draw.var - var).abs() < 4 * var_se).all()
        # the draws themselves: 20000 z for the first x
        many = enc(x[:1].expand(20000, 5), num_samples=1).z[0]
        m = 20000
        assert ((many.mean(0) - mean[0]).abs() < 4 * (var[0] / m).sqrt()).all()
        assert ((many.var(0) - var[0]).abs() < 4 * var[0] * math.sqrt(2 / (m - 1))).all()


def test_adaptive_contrast_normalises_q_and_stops_gradients_through_the_moments() -> None:
    """z~ = (z - mu) / sigma has mean 0 and variance 1 under q; log r - log p is the closed-form
    Gaussian log-ratio; and because mu, sigma are detached, dz~/dz0 = 1/sigma (it would be 0 if
    gradients flowed through mu = z0 + ...)."""
    model = AVB(data_dim=5, latent_dim=2, net={"hidden_dims": [16]}, adaptive_contrast=True,
                encoder={"kind": "basis", "noise_dim": 3, "n_basis": 4, "basis_hidden": [8], "min_moment_draws": 20000})
    # one x, 2000 draws of z scored against moments estimated from 20000 noise draws
    x = torch.randn(1, 5, generator=torch.Generator().manual_seed(0)).expand(2000, 5)
    torch.manual_seed(1)
    draw = model.draw(x, 1)
    z_tilde, closed = model.contrast(draw)
    zt = z_tilde.detach()[0]
    n = zt.shape[0]
    std = (draw.var.detach() + model.var_floor).sqrt()
    # mean 0 within 4 SE; var = Var[z] / (Var[z] + floor) within 4 SE of a sample variance (kurtosis-aware)
    assert (zt.mean(0).abs() < 4 * zt.std(0) / math.sqrt(n)).all()
    kurt = ((zt - zt.mean(0)).pow(4).mean(0) / zt.var(0).pow(2))
    expected_var = draw.var.detach()[0] / std[0].pow(2)
    assert ((zt.var(0) - expected_var).abs() < 4 * expected_var * ((kurt - 1) / n).sqrt()).all()
    z = draw.z.detach()[0]
    log_r = torch.distributions.Normal(draw.mean.detach()[0], std[0]).log_prob(z).sum(-1)
    torch.testing.assert_close(closed.detach()[0], log_r - model.model.prior.log_prob(z), atol=1e-4, rtol=1e-5)
    bias = model.encoder.trunk[-1].bias
    (grad,) = torch.autograd.grad(z_tilde[0, 0, 0], bias)
    torch.testing.assert_close(grad[0], 1.0 / std[0, 0], rtol=1e-5, atol=0)


def test_bad_avb_settings_fail_before_training() -> None:
    with pytest.raises(ConfigError, match="adaptive_contrast"):  # q's variance needs 2 draws (independent of z)
        AVB(data_dim=4, latent_dim=2, adaptive_contrast=True, encoder={"kind": "concat", "min_moment_draws": 1})
    with pytest.raises(ConfigError, match="hidden_dims"):
        AVB(data_dim=4, latent_dim=2, discriminator={"kind": "residual", "hidden_dims": [256, 128]})
    with pytest.raises(ConfigError, match="encoder.kind"):
        AVB(data_dim=4, latent_dim=2, encoder={"kind": "flow"})
    with pytest.raises(ConfigError, match="discriminator.kind"):
        AVB(data_dim=4, latent_dim=2, discriminator={"kind": "cnn"})
    with pytest.raises(ConfigError, match="lr"):
        AVB(data_dim=4, latent_dim=2, disc_optimizer=functools.partial(torch.optim.Adam, lr=0.0))


# ----------------------------------------------------------------------------- grid quadrature


def test_grid_quadrature_is_exact_on_a_linear_gaussian_model() -> None:
    """p(x) = N(b, W W^T + s2 I) and p(z|x) Gaussian in closed form. The truncation error of [-6, 6]^2 is
    below 4e-9 of the prior mass and the midpoint rule is spectrally accurate on Gaussians, so what is
    left is float32 round-off: 2e-4 nats."""
    truth = LinearGaussian.random(5, 2, s2=0.5, generator=torch.Generator().manual_seed(0))
    model = truth.to_model()
    x, _ = truth.sample(6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(grid_log_likelihood(model, x), truth.log_marginal(x), atol=2e-4, rtol=0)
    probs, axis = grid_posterior(model, x)
    zy, zx = torch.meshgrid(axis, axis, indexing="ij")
    post_mean = torch.stack([(probs * zx).sum((1, 2)), (probs * zy).sum((1, 2))], -1)
    torch.testing.assert_close(post_mean, truth.posterior(x)[0], atol=1e-3, rtol=0)


# ----------------------------------------------------------------------------- the paper's toy


TOY_NET = {"kind": "mlp", "hidden_dims": [64, 64, 64], "activation": "elu"}
# 100 epochs x 10 batches; both methods drop their learning rates 10x for the last 30 epochs
TOY_SCHEDULE = functools.partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[70], gamma=0.1)
TOY_EVAL = {"ais_steps": 20, "ais_chains": 2, "ais_leapfrog": 2}  # test/nll is not what this test checks


def toy_fit(model: AVB | VAE, tmp_path: Path) -> dict[str, float]:
    model.configure_evaluation(val=TOY_EVAL, test=TOY_EVAL)
    dm = AVBToyDataModule(num_train=1280, batch_size=128, num_val=4, num_test=4)
    trainer = quiet_trainer(max_epochs=100, limit_val_batches=0,
                            callbacks=[PosteriorGrid(tmp_path, resolution=161, n_samples=300)])
    trainer.fit(model, datamodule=dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    trainer.test(model, datamodule=dm, verbose=False)
    return metrics | {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_avb_toy_reaches_log_quarter_and_beats_the_vae(tmp_path: Path) -> None:
    """The paper's 4-point toy. The best model puts each point on a quarter of the prior mass:
    log p(x) = log(1/4) per point. A VAE's Gaussian posteriors cannot tile the latent space, so the
    decoder stays blurred; AVB's implicit posterior can. After the same 1000 steps AVB's exact
    (quadrature) log-likelihood must be within 0.12 nats of log(1/4) and above the VAE's.
    (Over seeds 0-5 this setting gives AVB -1.42 to -1.50 and the VAE -1.51 to -1.59.)"""
    L.seed_everything(0)
    avb = AVB(data_dim=4, latent_dim=2, net=TOY_NET, adaptive_contrast=True,
              encoder={"kind": "basis", "noise_dim": 64, "n_basis": 8, "basis_hidden": [32, 32], "basis_offset": 1.0},
              discriminator={"kind": "mlp", "hidden_dims": [128, 128], "activation": "elu"},
              optimizer=functools.partial(torch.optim.Adam, lr=2e-3),
              disc_optimizer=functools.partial(torch.optim.Adam, lr=5e-3), scheduler=TOY_SCHEDULE)
    avb_metrics = toy_fit(avb, tmp_path / "avb")
    L.seed_everything(0)
    vae = VAE(data_dim=4, latent_dim=2, net=TOY_NET, optimizer=functools.partial(torch.optim.Adam, lr=2e-3),
              scheduler=TOY_SCHEDULE)
    vae_metrics = toy_fit(vae, tmp_path / "vae")
    avb_ll, vae_ll = avb_metrics["test/exact_log_lik"], vae_metrics["test/exact_log_lik"]
    print(f"exact log-likelihood per point: AVB {avb_ll:.4f}, VAE {vae_ll:.4f}, log(1/4) = {LOG_QUARTER:.4f}")
    assert avb_ll > LOG_QUARTER - 0.12, (avb_ll, vae_ll)
    assert avb_ll > vae_ll, (avb_ll, vae_ll)
    assert avb_ll <= LOG_QUARTER + 1e-4  # nothing beats the data's own entropy
    assert math.isfinite(avb_metrics["train/disc_loss"])
    for run in ("avb", "vae"):
        assert (tmp_path / run / "posteriors.png").stat().st_size > 0


def test_checkpoint_keeps_both_optimizers_and_resumes(tmp_path: Path) -> None:
    """Manual optimisation with two optimisers: a checkpoint holds both Adam states, loads with
    weights_only=True, and training resumes from it."""
    L.seed_everything(0)
    dm = AVBToyDataModule(num_train=64, batch_size=32, num_val=4, num_test=4)
    model = AVB(data_dim=4, latent_dim=2, net={"hidden_dims": [8]}, discriminator={"hidden_dims": [8]},
                encoder={"noise_dim": 4}, disc_steps=2)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2 * (1 + 2)  # 2 batches x (1 model step + 2 discriminator steps)
    path = tmp_path / "avb.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert len(ckpt["optimizer_states"]) == 2
    assert ckpt["optimizer_states"][1]["param_groups"][0]["betas"] == (0.5, 0.999)  # the paper's discriminator Adam
    resumed = AVB(**{k: v for k, v in ckpt["hyper_parameters"].items()})
    trainer2 = quiet_trainer(max_epochs=2, limit_val_batches=0)
    trainer2.fit(resumed, datamodule=dm, ckpt_path=path)
    assert trainer2.global_step == 2 * 2 * (1 + 2)


# ----------------------------------------------------------------------------- the app on MNIST


def test_avb_ac_trains_on_mnist_through_the_app(tmp_path: Path, shared_data_dir: Path) -> None:
    """`latentlab-train model=avb_ac data=mnist` end to end on a small subset with a fast AIS."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "latentlab.train", "model=avb_ac", "data=mnist", "net=mlp", "net.hidden_dims=[64]",
           f"paths.data_dir={shared_data_dir}", f"hydra.run.dir={run_dir}", "logger=csv", "trainer.max_epochs=2",
           "data.train_subset=512", "data.val_subset=100", "data.test_subset=50", "data.batch_size=64",
           "model.latent_dim=8", "model.encoder.n_basis=4", "model.encoder.basis_hidden=[16]",
           "model.discriminator.hidden_dims=[64]", "model.discriminator.embed_dim=32",
           "eval.nll.ais_steps=10", "eval.nll.ais_chains=2", "eval.nll.ais_leapfrog=2", "eval.val_nll.val_every_n_epochs=0",
           "callbacks.progress_bar=null", "callbacks.model_summary=null", "callbacks.image_grid.n=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["test/nll"]) and metrics["test/nll"] > 0
    assert math.isfinite(metrics["train/disc_loss"])
    assert 0.0 <= metrics["train/disc_acc"] <= 1.0
    assert math.isfinite(metrics["test/elbo"]) and (run_dir / "checkpoints" / "last.ckpt").is_file()
