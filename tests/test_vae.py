"""The VAE on probabilistic PCA, where log p(x) and the maximum likelihood are known in closed form."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from latentlab.analytic import LinearGaussian, ppca_max_log_likelihood
from latentlab.models import VAE
from latentlab.nets.gaussian import elbo_terms

D, d, N = 6, 2, 4000


def ppca_data(seed: int = 0) -> tuple[LinearGaussian, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    truth = LinearGaussian.random(D, d, s2=0.3, generator=g)
    x, _ = truth.sample(N, generator=g)
    return truth, x


def linear_vae(**kw: object) -> VAE:
    return VAE(data_dim=D, latent_dim=d, net={"kind": "mlp", "hidden_dims": []},
               likelihood={"kind": "gaussian", "variance": 1.0, "learn_variance": True},
               optimizer=lambda p: torch.optim.Adam(p, lr=2e-2), **kw)


def fit(model: VAE, x: torch.Tensor, epochs: int) -> None:
    loader = DataLoader(TensorDataset(x, torch.arange(len(x))), batch_size=200, shuffle=True)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, loader)


def learned_marginal(model: VAE) -> torch.distributions.MultivariateNormal:
    """The trained linear-Gaussian decoder's exact p(x) = N(b, W W^T + diag(var))."""
    lin = model.model.decoder[0]
    W, b = lin.weight.detach(), lin.bias.detach()
    var = model.model.likelihood.log_var.detach().exp()
    return torch.distributions.MultivariateNormal(b, covariance_matrix=W @ W.T + torch.diag(var))


@pytest.fixture(scope="module")
def trained() -> tuple[VAE, torch.Tensor]:
    torch.manual_seed(0)
    _, x = ppca_data()
    model = linear_vae(num_samples=4)
    fit(model, x, epochs=60)
    return model, x


def test_linear_vae_elbo_reaches_ppca_maximum_likelihood(trained: tuple[VAE, torch.Tensor]) -> None:
    """ELBO <= log p(x) <= max log-likelihood; a linear VAE's ELBO can be tight (its posterior is Gaussian)."""
    model, x = trained
    best = ppca_max_log_likelihood(x, d)
    with torch.no_grad():
        recon, kl = elbo_terms(model.encoder, partial(model.model.log_likelihood, x), x, num_samples=64)
        elbo = float((recon - kl).mean())
        exact = float(learned_marginal(model).log_prob(x).mean())
    assert elbo >= best - 0.5, (elbo, best)
    # per-dimension noise can beat isotropic PPCA only by what D-1 extra parameters buy on N points
    assert exact <= best + 0.05, (exact, best)
    assert elbo <= exact + 0.02  # the ELBO is a lower bound (up to its own Monte Carlo error)


def test_importance_sampling_estimate_matches_exact_log_likelihood(trained: tuple[VAE, torch.Tensor]) -> None:
    model, x = trained
    x = x[:200]
    with torch.no_grad():
        exact = learned_marginal(model).log_prob(x)
    torch.manual_seed(1)
    log_px = model.log_px(x, stage="test").log_px
    # with the VAE's near-exact Gaussian posterior the weights barely vary: error per example << 0.05 nats
    assert (log_px - exact).abs().mean() < 0.05
    torch.manual_seed(1)
    model.nll_settings["test"] = replace(model.nll_settings["test"], k=1)
    elbo_like = model.log_px(x, stage="test").log_px
    assert float(elbo_like.mean()) <= float(log_px.mean()) + 1e-3  # k=1 is the ELBO, the loosest bound


def test_kl_warmup_ramps_beta() -> None:
    model = linear_vae(kl_warmup_epochs=2.0)
    _, x = ppca_data()
    loader = DataLoader(TensorDataset(x[:400], torch.arange(400)), batch_size=100)
    seen: list[float] = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
            seen.append(pl_module.kl_weight())

    L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[Spy()],
              enable_model_summary=False).fit(model, loader)
    assert seen[0] == pytest.approx(1 / 8)
    assert seen[7] == pytest.approx(1.0) and seen[-1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(seen, seen[1:]))
