"""The VAE on probabilistic PCA, where log p(x) and the maximum likelihood are known in closed form."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from functools import partial

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from latentlab.analytic import LinearGaussian, ppca_max_log_likelihood
from latentlab.models import VAE
from latentlab.nets.gaussian import elbo_terms
from trainers import quiet_trainer

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
    quiet_trainer(max_epochs=epochs).fit(model, loader)


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

    quiet_trainer(max_epochs=3, callbacks=[Spy()]).fit(model, loader)
    assert seen[0] == pytest.approx(1 / 8)
    assert seen[7] == pytest.approx(1.0) and seen[-1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(seen, seen[1:]))


def test_sanity_check_runs_the_estimator_on_two_examples_and_logs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's sanity check exercises val/nll's estimator on SANITY_EXAMPLES examples (a whole batch of AIS with
    a conv decoder took minutes on a CPU before the first step); the epoch's validation estimates the whole batch."""
    import latentlab.models.base as base

    seen: list[tuple[bool, int]] = []
    real = base.estimate_log_px

    def spy(model, x, posterior, settings, generator):  # type: ignore[no-untyped-def]
        seen.append((trainer.sanity_checking, x.shape[0]))
        return real(model, x, posterior, settings, generator)

    monkeypatch.setattr(base, "estimate_log_px", spy)
    _, x = ppca_data()
    loader = DataLoader(TensorDataset(x[:300], torch.arange(300)), batch_size=100)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=1)
    trainer.fit(linear_vae(), loader, loader)
    assert seen == [(True, base.SANITY_EXAMPLES), (False, 100)]
    assert "val/nll" in trainer.callback_metrics


def test_hook_name_fast_path_leaves_module_registration_alone() -> None:
    """`_current_fx_name` skips nn.Module's checks (LeanLightningModule); everything else still registers."""
    model = linear_vae()
    model._current_fx_name = "training_step"
    assert model._current_fx_name == "training_step" and "_current_fx_name" not in model._modules
    model.extra = torch.nn.Linear(2, 2)
    model.scale = torch.nn.Parameter(torch.ones(()))
    assert "extra" in dict(model.named_children()) and "scale" in dict(model.named_parameters())


def test_latentlab_train_is_the_hand_written_loop_bit_for_bit(tmp_path) -> None:
    """With every default callback on (progress bar, checkpoints, RNG states, NaN guard, logger) and the fused Adam
    latentlab picks, a VAE run equals the loop a researcher writes, given the same init, shuffle and noise: the
    benchmark's speed ratios compare equal work, and no default changes a result."""
    import copy

    import torch.nn.functional as F

    from latentlab.builders import build_callbacks, build_datamodule, build_loggers, build_model, build_trainer, compose_config, resolve_paths
    from latentlab.data.resumable import ResumableSampler

    cfg = compose_config(["data.binarize=static", "data.binarize_threshold=0.5", "data.val_size=0", "trainer.max_epochs=2",
                          "trainer.num_sanity_val_steps=0", "model.latent_dim=4", "test=false"], output_dir=tmp_path)
    resolve_paths(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    model = build_model(cfg, dm)

    class Record(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.rng, self.init, self.losses = torch.get_rng_state(), copy.deepcopy(pl_module), []
            self.flags = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, i) -> None:
            self.losses.append(outputs["loss"].detach().clone())

    record = Record()
    build_trainer(cfg, [*build_callbacks(cfg), record], build_loggers(cfg)).fit(model, datamodule=dm)

    enc, dec = record.init.encoder.net, record.init.model.decoder  # plain nn.Sequential MLPs
    opt = torch.optim.Adam([*dec.parameters(), *enc.parameters()], lr=cfg.model.optimizer.lr, fused=True)
    torch.set_rng_state(record.rng)
    x, losses = dm.data("train"), []
    for epoch in range(2):
        order = ResumableSampler(len(x), cfg.data.seed).order(epoch)
        for i in range(0, len(x), cfg.data.batch_size):
            xb = x[order[i: i + cfg.data.batch_size]]
            mu, log_var = enc(xb).chunk(2, -1)
            log_var = log_var.clamp(min=-12.0)
            z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
            recon = -F.binary_cross_entropy_with_logits(dec(z), xb, reduction="none").sum(-1)
            kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum(-1)
            loss = -(recon - kl).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    assert len(losses) == len(record.losses) == 2 * -(-len(x) // cfg.data.batch_size)
    assert record.flags == (True, False)  # deterministic kernels, no NaN fill of new tensors: still the same numbers
    assert torch.equal(torch.stack(losses), torch.stack(record.losses))
    for ours, theirs in zip([*dec.parameters(), *enc.parameters()], [*model.model.decoder.parameters(), *model.encoder.net.parameters()]):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("method", ["vae", "avb"])
def test_validation_leaves_the_training_run_alone(tmp_path, method) -> None:
    """Validation's ELBO draws (and AVB's discriminator draws) come from the evaluation's own keyed stream, not the
    global one the training's noise comes from: a run with a sanity check and validation every epoch ends with the
    same weights, bit for bit, as the same run with no validation at all, and its val/elbo is the same number
    however often it is recomputed on the same weights."""
    from latentlab.builders import build_datamodule, build_model, build_trainer, compose_config, resolve_paths

    def train(*overrides: str) -> tuple[L.LightningModule, L.Trainer, object]:
        cfg = compose_config([f"model={method}", "model.latent_dim=4", "trainer.max_epochs=2", "test=false",
                              "callbacks=none", "logger=none", *overrides],
                             output_dir=tmp_path / "_".join(overrides))
        resolve_paths(cfg)
        L.seed_everything(cfg.seed, verbose=False)
        dm = build_datamodule(cfg)
        model = build_model(cfg, dm)
        trainer = build_trainer(cfg, [], [])
        trainer.fit(model, datamodule=dm)
        return model, trainer, dm

    validated, trainer, dm = train("trainer.num_sanity_val_steps=1", "trainer.check_val_every_n_epoch=1")
    plain, _, _ = train("trainer.num_sanity_val_steps=0", "+trainer.limit_val_batches=0")
    assert "val/elbo" in trainer.callback_metrics
    for ours, theirs in zip(validated.parameters(), plain.parameters()):
        assert torch.equal(ours, theirs)
    again = [float(trainer.validate(validated, datamodule=dm, verbose=False)[0]["val/elbo"]) for _ in range(2)]
    assert again[0] == again[1]


@pytest.mark.parametrize("fill", [None, True])
def test_fill_uninitialized_memory_follows_the_config(tmp_path, fill) -> None:
    """trainer.deterministic would have torch NaN-fill every new tensor (a memory pass over each activation and
    gradient); latentlab turns that fill off unless `fill_uninitialized_memory=true` asks for it."""
    from latentlab.builders import build_trainer, compose_config, resolve_paths

    cfg = compose_config([] if fill is None else [f"fill_uninitialized_memory={str(fill).lower()}"], output_dir=tmp_path)
    resolve_paths(cfg)
    before = torch.utils.deterministic.fill_uninitialized_memory
    try:
        torch.utils.deterministic.fill_uninitialized_memory = not bool(fill)
        build_trainer(cfg, [], [])
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.utils.deterministic.fill_uninitialized_memory is bool(fill)
        if fill:  # what the switch controls: a new tensor's contents under deterministic mode
            assert torch.isnan(torch.empty(8)).all()
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = before


class FlagProbe(L.Callback):
    """Each process writes down torch's deterministic and NaN-fill switches as its training starts."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        flags = f"{torch.are_deterministic_algorithms_enabled()} {torch.utils.deterministic.fill_uninitialized_memory}"
        (Path(self.out) / f"rank{trainer.global_rank}").write_text(flags)


def test_processes_ddp_spawn_starts_get_the_fill_switch_too(tmp_path) -> None:
    """Lightning carries the deterministic switch into the processes `ddp_spawn` starts, not torch's NaN-fill flag:
    without `TorchSwitches` both ranks NaN-filled every new tensor again."""
    from latentlab.builders import build_datamodule, build_model, build_trainer, compose_config, resolve_paths

    cfg = compose_config(["trainer=ddp_spawn", "trainer.devices=2", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
                          "+trainer.limit_val_batches=0", "test=false", "logger=none", "callbacks=none"],
                         output_dir=tmp_path / "run")
    resolve_paths(cfg)
    dm = build_datamodule(cfg)
    before = torch.utils.deterministic.fill_uninitialized_memory
    try:
        build_trainer(cfg, [FlagProbe(str(tmp_path))], []).fit(build_model(cfg, dm), datamodule=dm)
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = before
        torch.use_deterministic_algorithms(False)
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["True False"] * 2

