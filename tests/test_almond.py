"""ALMOND: the Langevin E-step samples the model's posterior, stochastic EM reaches the PPCA maximum
likelihood, chains persist through checkpoints and DDP, and the latent-space callbacks measure what
they claim. Linear-Gaussian models give every answer in closed form."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import open_dict
from scipy import integrate, stats
from torch.utils.data import DataLoader, Sampler, TensorDataset

from latentlab.analytic import LinearGaussian, ppca_max_log_likelihood
from latentlab.callbacks import LatentDistributionMetrics, LatentMap
from latentlab.callbacks.latents import latent_distribution_distances, learned_latents
from latentlab.data import DigitsDataModule, NormalMeansDataModule
from latentlab.errors import CheckpointError, ConfigError, NumericalError
from latentlab.models import ALMOND, VAE
from latentlab.estimators import NLLSettings, importance_sampling
from latentlab.models.almond import first_occurrences, inverse_sqrt_lr, langevin_step_size
from latentlab.models.chains import PersistentChains
from latentlab.posterior import GaussianPosterior
from latentlab.samplers import MALA, ULA
from trainers import quiet_trainer

D, d = 6, 2


def ppca_data(n: int, seed: int = 0) -> tuple[LinearGaussian, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    truth = LinearGaussian.random(D, d, s2=0.3, generator=g)
    return truth, truth.sample(n, generator=g)[0]


def linear_almond(step_size: float = 0.1, langevin_steps: int = 5, sampler: str = "ula", **kw: object) -> ALMOND:
    """Linear decoder + Gaussian likelihood: p(x) and p(z | x) are Gaussian and known exactly."""
    kernel = MALA(step_size, langevin_steps) if sampler == "mala" else ULA(step_size, langevin_steps)
    args: dict = dict(data_dim=D, latent_dim=d, net={"kind": "mlp", "hidden_dims": []},
                      likelihood={"kind": "gaussian", "variance": 1.0, "learn_variance": True},
                      optimizer=lambda p: torch.optim.Adam(p, lr=2e-2), n_chains=10, sampler=kernel)
    args.update(kw)
    return ALMOND(**args)


class EpochShuffle(Sampler[int]):
    """A shuffle keyed on (seed, epoch) (Lightning calls `set_epoch`), so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):  # type: ignore[no-untyped-def]
        generator = torch.Generator().manual_seed(1000 * self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


def loader(x: torch.Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, torch.arange(len(x))), batch_size=batch_size, sampler=EpochShuffle(len(x)))


def learned_marginal(model: ALMOND) -> torch.distributions.MultivariateNormal:
    """The trained linear-Gaussian decoder's exact p(x) = N(b, W W^T + diag(var))."""
    lin = model.model.decoder[0]
    W, b = lin.weight.detach(), lin.bias.detach()
    var = model.model.likelihood.log_var.detach().exp()
    return torch.distributions.MultivariateNormal(b, covariance_matrix=W @ W.T + torch.diag(var))


# ----- the E-step ---------------------------------------------------------------------------------


def test_step_size_and_learning_rate_schedules_follow_the_paper() -> None:
    s = 0.1
    assert [langevin_step_size(s, e) for e in (0, 3, 99, 500)] == pytest.approx([0.1, 0.05, 0.01, 0.01])
    assert langevin_step_size(s, 50, decay=False) == s
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = inverse_sqrt_lr(opt, warmup_epochs=2)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 1.0, 1.0, 1 / math.sqrt(2), 1 / math.sqrt(3)])


def test_e_step_samples_the_exact_ula_stationary_law_of_the_posterior() -> None:
    """Persistent ULA chains on a linear-Gaussian model: p(z | x) = N(m, A^-1) with A = I + W^T W / s2,
    and ULA with step s leaves N(m, (A (I - s A / 2))^-1) invariant, exactly (Gaussian target)."""
    g = torch.Generator().manual_seed(1)
    truth = LinearGaussian.random(D, d, s2=0.5, generator=g)
    x = truth.sample(4, generator=g)[0]
    s, chains = 0.02, 2000
    model = ALMOND(data_dim=D, latent_dim=d, net={"kind": "mlp", "hidden_dims": []},
                   likelihood={"kind": "gaussian", "variance": truth.s2}, n_chains=chains, sampler=ULA(s, 50),
                   num_train=4)
    with torch.no_grad():
        model.model.decoder[0].weight.copy_(truth.W)
        model.model.decoder[0].bias.copy_(truth.b)
    index = torch.arange(4)
    for call in range(8):  # 400 steps: contraction (1 - s)^400 < 1e-3 of the prior start; chains persist
        z, stats_ = model.e_step(x, index, torch.Generator().manual_seed(call))
    assert bool(model.visited.all()) and torch.equal(model.chain_states(index), z)
    mean, cov = truth.posterior(x)
    A = torch.linalg.inv(cov)
    ula_cov = torch.linalg.inv(A @ (torch.eye(d) - s * A / 2))
    var = ula_cov.diagonal()
    # chains are independent: the mean of each coordinate has standard error sqrt(var / chains)
    assert ((z.mean(0) - mean).abs() / (var / chains).sqrt()).max() < 4.5
    # the covariance is shared by the 4 examples: pool 4 * chains centred draws; var's s.e. is var sqrt(2 / n)
    centred = (z - mean).reshape(-1, d)
    n = centred.shape[0]
    emp = centred.T @ centred / n
    assert ((emp.diagonal() - var).abs() / (var * math.sqrt(2 / n))).max() < 4.5
    # and it is ULA's law, not the exact posterior's, which differs here by more than that tolerance
    assert ((cov.diagonal() - var).abs() / (var * math.sqrt(2 / n))).max() > 6
    assert stats_["step_size"] == pytest.approx(s) and stats_["grad_norm"] > 0


def test_non_finite_chain_states_raise_a_numerical_error_naming_the_sampler() -> None:
    model = linear_almond(step_size=1e6, langevin_steps=10, num_train=8)
    x = ppca_data(8)[1]
    with pytest.raises(NumericalError, match=r"sampler.*step"):
        model.e_step(x, torch.arange(8), torch.Generator().manual_seed(0))
    assert not bool(model.visited.any()) and torch.equal(model.chains, torch.zeros_like(model.chains))


def test_first_occurrences_dedupes_ddp_padding() -> None:
    index = torch.tensor([5, 2, 5, 7, 2])
    assert first_occurrences(index).tolist() == [1, 0, 3]  # values 2, 5, 7 first seen at 1, 0, 3


# ----- stochastic EM --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_ppca() -> tuple[ALMOND, torch.Tensor, torch.Tensor]:
    _, x = ppca_data(1200)
    x_train, x_test = x[:1000], x[1000:]
    torch.manual_seed(0)
    model = linear_almond()
    quiet_trainer(max_epochs=20).fit(model, loader(x_train, 100))
    return model, x_train, x_test


def test_almond_reaches_the_ppca_maximum_likelihood(trained_ppca: tuple[ALMOND, torch.Tensor, torch.Tensor]) -> None:
    model, x_train, _ = trained_ppca
    best = ppca_max_log_likelihood(x_train, d)
    exact = float(learned_marginal(model).log_prob(x_train).mean())
    assert exact >= best - 0.5, (exact, best)
    # per-dimension noise can beat isotropic PPCA only by what D - 1 extra parameters buy on N points
    assert exact <= best + 0.05, (exact, best)
    assert bool(model.visited.all())


def test_aggregate_posterior_is_the_first_persistent_chain_of_every_training_example(
        trained_ppca: tuple[ALMOND, torch.Tensor, torch.Tensor]) -> None:
    """What a latent prior is fitted to (latentlab.latent_prior): ALMOND's own chains, not fresh draws."""
    model, x_train, _ = trained_ppca
    assert torch.equal(model.aggregate_posterior(x_train), model.chains[0])
    rows = torch.tensor([5, 2, 9])
    assert torch.equal(model.aggregate_posterior(x_train, index=rows), model.chains[0][rows])


def test_posterior_draws_give_the_exact_log_likelihood(
        trained_ppca: tuple[ALMOND, torch.Tensor, torch.Tensor]) -> None:
    """ALMOND's posterior has no density, so in 2-d the protocol runs IS from a kernel mixture of its draws. Those
    draws (fresh Langevin chains for unseen data, the persistent chains for training data) are good enough that
    their moment fit, inflated 1.2x, is an importance-sampling proposal whose weights (k = 1000) leave an error
    of a few hundredths of a nat per example."""
    model, x_train, x_test = trained_ppca
    assert not model.posterior(x_test).has_density and NLLSettings.preset("standard").resolve(False, d) == "is"
    with torch.no_grad():
        exact_test = learned_marginal(model).log_prob(x_test)
        exact_train = learned_marginal(model).log_prob(x_train[:200])
    estimate = model.log_px(x_test[:10], torch.arange(10), "test", torch.Generator().manual_seed(0))
    assert estimate.estimator == "is" and estimate.log_px.shape == (10,)
    assert abs(float((estimate.log_px - exact_test[:10]).mean())) < 0.05  # the protocol's own number: unbiased
    gen = torch.Generator().manual_seed(0)
    mean, log_var = model.posterior(x_test).fitted_gaussian(model.eval_chains, gen)  # no index: unseen data
    fresh = GaussianPosterior(mean, log_var + 2 * math.log(1.2))
    log_px = importance_sampling(model.model.log_joint, x_test, fresh, 1000, 250, gen).log_px
    assert (log_px - exact_test).abs().mean() < 0.05
    index = torch.arange(200)
    chains = model.chain_states(index)
    mean, log_var = model.posterior(x_train[:200], index, split="train").fitted_gaussian(model.n_chains)
    q = GaussianPosterior(mean, log_var + 2 * math.log(1.2))
    assert torch.allclose(q.mean, chains.mean(0))
    assert torch.allclose((0.5 * q.log_var).exp(), 1.2 * chains.std(0).clamp(min=1e-3))
    log_px = importance_sampling(model.model.log_joint, x_train[:200], q, 1000, 250, torch.Generator().manual_seed(0)).log_px
    assert (log_px - exact_train).abs().mean() < 0.05


def test_vae_warm_up_then_langevin_phase(tmp_path: Path) -> None:
    """Phase 0 trains encoder + decoder; phase 1 leaves the encoder alone, starts chains at its draws,
    and decays the Langevin step as s_e = max(s/10, s/sqrt(e+1))."""
    x = ppca_data(200)[1]
    model = linear_almond(vae_epochs=1, step_size=0.05)
    seen: list[tuple[int, float, float, dict]] = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            m = trainer.callback_metrics
            seen.append((trainer.current_epoch, float(m["train/phase"]), pl_module.current_step_size(),
                         {k: v.clone() for k, v in pl_module.encoder.state_dict().items()}))

    quiet_trainer(max_epochs=3, callbacks=[Spy()]).fit(model, loader(x, 100))
    assert [p for _, p, _, _ in seen] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert [s for _, _, s, _ in seen[2:]] == pytest.approx([0.05, 0.05, 0.05 / math.sqrt(2), 0.05 / math.sqrt(2)])
    enc = [state for _, _, _, state in seen]
    assert not torch.equal(enc[0]["net.0.weight"], enc[1]["net.0.weight"])  # trained during the warm-up
    assert all(torch.equal(enc[1][k], e[k]) for e in enc[2:] for k in e)  # untouched afterwards
    assert model.chain_init == "encoder" and bool(model.visited.all())


# ----- checkpoints and DDP --------------------------------------------------------------------


@pytest.mark.parametrize("sampler, table", [("ula", False), ("mala", False), ("ula", True)])
def test_resume_from_last_ckpt_continues_the_same_chains(tmp_path: Path, sampler: str, table: bool,
                                                         decoder_tables: list) -> None:
    """Also for a 1-d latent whose Langevin moves read the decoder table (a softplus layer: a curved decoder)."""
    x = ppca_data(60)[1]
    kw: dict = dict(latent_dim=1, net={"kind": "mlp", "hidden_dims": [8], "activation": "softplus"}) if table else {}

    def run(max_epochs: int, root: Path, ckpt: str | None = None) -> ALMOND:
        torch.manual_seed(0)
        model = linear_almond(sampler=sampler, sampler_seed=7, **kw)
        trainer = quiet_trainer(max_epochs=max_epochs, enable_checkpointing=True, default_root_dir=root,
                                callbacks=[ModelCheckpoint(dirpath=root, save_last=True)])
        trainer.fit(model, loader(x, 20), ckpt_path=ckpt)
        return model

    straight = run(2, tmp_path / "a")
    run(1, tmp_path / "b")
    ckpt = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)  # what latentlab-eval does
    assert ckpt["almond"]["chains"].shape == (10, 60, 1 if table else d) and bool(ckpt["almond"]["visited"].all())
    resumed = run(2, tmp_path / "c", ckpt=str(tmp_path / "b" / "last.ckpt"))
    assert torch.allclose(straight.chains, resumed.chains, atol=1e-6)
    assert not torch.allclose(ckpt["almond"]["chains"], resumed.chains)  # they did move in epoch 2
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    if sampler == "mala":
        assert torch.allclose(straight.chain_step_sizes, resumed.chain_step_sizes)
        assert torch.equal(straight.store.count, resumed.store.count) and bool((resumed.store.count == 2 * 5).all())  # 2 epochs x 5 moves
    assert len(decoder_tables) == (3 * (2 + 1 + 1) if table else 0) and None not in decoder_tables  # 3 batches x (2 + 1 + 1 resumed) epochs
    # a fresh model takes the weights strictly (chains are not in the state_dict) and the chains via the hook
    fresh = linear_almond(sampler=sampler, **kw)
    assert fresh.load_state_dict(ckpt["state_dict"], strict=True)
    fresh.on_load_checkpoint(ckpt)
    assert torch.equal(fresh.chains, ckpt["almond"]["chains"]) and fresh.seed == 7


def test_block_workers_train_exactly_as_one_thread() -> None:
    """Warm-up, E-step and M-step in 50-row blocks on two threads: the same chains and weights as on one."""
    x = ppca_data(60)[1]

    def run(workers: int) -> ALMOND:
        torch.manual_seed(0)
        model = linear_almond(sampler_seed=7, vae_epochs=1, vae_num_samples=10, block_rows=50, block_workers=workers)
        quiet_trainer(max_epochs=3).fit(model, loader(x, 20))
        return model

    one, two = run(1), run(2)
    torch.testing.assert_close(one.chains, two.chains, rtol=0, atol=0)
    for a, b in zip(one.parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class ChainDump(L.Callback):
    """Each process saves its chain buffer, and what it wrote itself in the last epoch."""

    def __init__(self, out: str) -> None:
        self.out, self.written = out, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.current_epoch == trainer.max_epochs - 1:
            self.written.append((batch[1].clone(), pl_module.chain_states(batch[1]).clone()))

    def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        torch.save({"chains": pl_module.chains, "visited": pl_module.visited, "written": self.written},
                   Path(self.out) / f"rank{trainer.global_rank}.pt")


def test_ddp_two_processes_keep_identical_chains(tmp_path: Path) -> None:
    """2 CPU processes (gloo), VAE warm-up then Langevin: every index is updated on both replicas."""
    N = 37  # odd, so DistributedSampler pads a duplicate example
    x = torch.randn(N, 3, generator=torch.Generator().manual_seed(0))
    model = ALMOND(data_dim=3, latent_dim=2, net={"kind": "mlp", "hidden_dims": [8]}, likelihood="gaussian",
                   n_chains=3, sampler=ULA(0.1, 2), vae_epochs=1)
    trainer = quiet_trainer(max_epochs=2, devices=2, strategy="ddp_spawn", callbacks=[ChainDump(str(tmp_path))])
    trainer.fit(model, DataLoader(TensorDataset(x, torch.arange(N)), batch_size=5, shuffle=True))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["chains"], r1["chains"])
    assert bool(r0["visited"].all()) and bool(r1["visited"].all())
    seen = [set(), set()]
    for rank, (mine, other) in enumerate(((r0, r1), (r1, r0))):
        for index, z in mine["written"]:
            seen[rank] |= set(index.tolist())
            # after the last epoch, the other replica holds what this one wrote (padding duplicates aside)
            same = (other["chains"][:, index] == z).all(-1).all(0)
            assert same.float().mean() >= (len(index) - 1) / len(index)
    assert seen[0] | seen[1] == set(range(N)) and len(seen[0]) < N and len(seen[1]) < N


# ----- configuration and evaluation choices ----------------------------------------------------


@pytest.mark.parametrize("kw, key", [({"n_chains": 0}, "n_chains"), ({"sampler": "hmc"}, "sampler"),
                                     ({"chain_init": "encoder"}, "vae_epochs"), ({"eval_chains": 1}, "eval_chains"),
                                     ({"mstep_warmup_epochs": -1}, "mstep_warmup_epochs"),
                                     ({"sampler": object()}, "sampler=ula|mala")])
def test_impossible_settings_are_refused_before_training(kw: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        ALMOND(data_dim=D, latent_dim=d, **kw)
    with pytest.raises(ValueError, match="step_size"):  # the sampler's own range (conf/sampler/)
        linear_almond(step_size=-1.0)


def test_posterior_has_no_density_so_the_protocol_uses_is_from_its_draws_in_2d_and_ais_above() -> None:
    model = linear_almond()
    post = model.posterior(torch.zeros(3, D), torch.arange(3))
    assert not post.has_density and post.gaussian() is None and post.sample(4).shape == (4, 3, d)
    standard = NLLSettings.preset("standard")
    assert standard.resolve(post.has_density, 2) == "is" and standard.resolve(post.has_density, 3) == "ais"


# ----- latent-space callbacks -------------------------------------------------------------------


def _set_affine_decoder(model: torch.nn.Module, scale: float, shift: float) -> None:
    with torch.no_grad():
        model.decoder[0].weight.fill_(scale)
        model.decoder[0].bias.fill_(shift)


def test_latent_distances_detect_the_true_and_a_wrong_latent_distribution() -> None:
    """h(z) = 2 + sqrt(.5) z pushes N(0, 1) to the true N(2, .5): KS below its 0.1% critical value
    and W1 within 4x its expected sampling size; h(z) = z is off by a mean shift of 2 (W1 >= 2)."""
    n = 10000
    vae = VAE(data_dim=1, latent_dim=1, net={"kind": "mlp", "hidden_dims": []}, likelihood="gaussian")
    dm = NormalMeansDataModule(prior="normal")
    callback = LatentDistributionMetrics(n_samples=n, seed=3)
    reference = callback.reference_sample(dm)
    _set_affine_decoder(vae.model, math.sqrt(0.5), 2.0)
    good = latent_distribution_distances(learned_latents(vae.model, n, torch.Generator().manual_seed(3)), reference)
    ks_critical = stats.kstwo.ppf(0.999, n // 2)  # two-sample with n = m: effective size n / 2
    j = integrate.quad(lambda t: math.sqrt(stats.norm.cdf(t) * stats.norm.sf(t)), -10, 10)[0]
    w1_expected = math.sqrt(2 / math.pi) * math.sqrt(2 / n) * math.sqrt(0.5) * j
    assert good["ks"] < ks_critical and good["w1"] < 4 * w1_expected, (good, ks_critical, w1_expected)
    _set_affine_decoder(vae.model, 1.0, 0.0)
    bad = latent_distribution_distances(learned_latents(vae.model, n, torch.Generator().manual_seed(0)), reference)
    assert bad["ks"] > 0.5 and bad["w1"] > 2.0 - 4 * w1_expected
    # the callback logs them through any model's test loop
    _set_affine_decoder(vae.model, math.sqrt(0.5), 2.0)
    trainer = quiet_trainer(callbacks=[LatentDistributionMetrics(n_samples=n, seed=3)])
    trainer.test(vae, datamodule=NormalMeansDataModule(prior="normal", num_test=200))
    assert float(trainer.callback_metrics["test/ks"]) == pytest.approx(good["ks"])
    assert float(trainer.callback_metrics["test/w1"]) == pytest.approx(good["w1"], rel=1e-5)


def test_latent_map_is_written_for_a_2d_model_and_refused_otherwise(tmp_path: Path) -> None:
    dm = DigitsDataModule(batch_size=100, val_size=0, train_subset=200, binarize="static")
    model = ALMOND(data_dim=dm.data_dim, latent_dim=2, image_shape=dm.image_shape,
                   net={"kind": "mlp", "hidden_dims": [32]},
                   n_chains=2, sampler=ULA(0.01, 2))
    latent_map = LatentMap(str(tmp_path), grid_size=5)
    trainer = quiet_trainer(max_epochs=1, limit_test_batches=0, callbacks=[latent_map])
    trainer.fit(model, dm)
    assert (tmp_path / "latent_map.png").stat().st_size > 10_000
    z, labels = latent_map.positions(trainer, model)  # the paper's picture: mean chain position, by label
    assert z.shape == (200, 2) and (labels == dm.labels("train").numpy()).all()
    assert torch.allclose(torch.from_numpy(z), model.chains.mean(0))
    wrong = ALMOND(data_dim=dm.data_dim, latent_dim=3, net={"kind": "mlp", "hidden_dims": [8]})
    with pytest.raises(ConfigError, match="latent_dim"):
        quiet_trainer(max_epochs=1, callbacks=[LatentMap(str(tmp_path))]).fit(wrong, dm)


# ----- shipped experiments ----------------------------------------------------------------------


def _compose(*overrides: str):  # type: ignore[no-untyped-def]
    with initialize_config_module(config_module="latentlab.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_mnist_experiments_compose_to_the_paper_settings() -> None:
    from hydra.utils import instantiate

    for name, latent in (("almond_mnist", 20), ("almond_mnist_2d", 2)):
        cfg = _compose(f"experiment={name}")
        model = instantiate(cfg.model, data_dim=784, image_shape=(1, 28, 28))
        assert isinstance(model, ALMOND) and model.latent_dim == latent and model.net_spec.kind == "conv"
        assert model.vae_epochs > 0 and model.chain_init == "encoder" and cfg.data.batch_size == 200
    assert "latent_map" in _compose("experiment=almond_mnist_2d").callbacks


@pytest.mark.parametrize("experiment, method", [("almond_normal_means", "almond"), ("vae_normal_means", "vae")])
def test_normal_means_experiments_run_end_to_end(tmp_path: Path, experiment: str, method: str) -> None:
    """The shipped configs, shortened: train, test, and report test/ks, test/w1 next to test/nll."""
    from latentlab.train import train

    cfg = _compose(f"experiment={experiment}", "trainer.max_epochs=3", "logger=csv", "eval.nll.k=20", "eval.val_nll.k=20",
                   *(["model.vae_epochs=1", "model.n_chains=5"] if method == "almond" else []))
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.callbacks.pop("progress_bar", None)
    metrics = train(cfg)
    assert {"test/ks", "test/w1", "test/nll"} <= set(metrics) and 0 <= metrics["test/ks"] <= 1
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["latentlab"]["method"] == method and (method != "almond" or "almond" in ckpt)


# ----- the chain store and MALA in the E-step ---------------------------------------------------


def test_persistent_chains_store_read_write_gather_and_state_dict() -> None:
    """Without a Trainer: fresh chains read the initial step and count 0, writes dedupe DDP padding, a fake
    two-process all-gather writes both processes' updates, and a copy of another shape is refused."""
    store = PersistentChains(3, 6, 2, step_size=0.5)
    z, fresh, step, count = store.read(torch.tensor([1, 4]))
    assert z.shape == (3, 2, 2) and bool(fresh.all()) and bool((step == 0.5).all()) and bool((count == 0).all())
    new = torch.randn(3, 3, 2)
    store.write(torch.tensor([1, 4, 1]), new, torch.full((3, 3), 0.25), torch.full((3, 3), 7))
    assert torch.equal(store.z[:, 1], new[:, 0]) and torch.equal(store.z[:, 4], new[:, 1])
    _, fresh, step, count = store.read(torch.tensor([1, 2]))
    assert fresh.tolist() == [False, True] and step[:, 0].tolist() == [0.25] * 3 and count[:, 1].tolist() == [0] * 3
    other = torch.randn(3, 1, 2)

    def two_processes(t: torch.Tensor) -> torch.Tensor:  # the other process wrote example 5 (z = other)
        if t.dim() == 0:
            return t.expand(2)
        return torch.stack([t, torch.tensor([5])]) if t.dim() == 1 else torch.stack([t, torch.cat([other, t[..., 2:]], -1)])

    store.write(torch.tensor([0]), torch.randn(3, 1, 2), torch.full((3, 1), 0.3), torch.full((3, 1), 2), two_processes)
    assert bool(store.visited[[0, 5]].all()) and torch.equal(store.z[:, 5], other[:, 0])
    state = store.state_dict()
    copy = PersistentChains(3, 6, 2, step_size=0.5)
    copy.load_state_dict(state)
    assert torch.equal(copy.z, store.z) and torch.equal(copy.count, store.count)
    with pytest.raises(CheckpointError, match="n_chains"):
        PersistentChains(4, 6, 2).load_state_dict(state)


def test_e_step_with_mala_samples_the_exact_posterior() -> None:
    """ALMOND's E-step with sampler=mala, 100 calls x 5 moves from the prior, on a linear-Gaussian decoder:
    adaptation stops after 100 moves per chain, then the chains sample p(z | x) = N(m, A^-1) itself (no ULA
    bias). 4 examples x 5000 chains pool 20000 draws: a variance's relative SE sqrt(2 / n) = 0.01, 4 SE."""
    g = torch.Generator().manual_seed(1)
    truth = LinearGaussian.random(D, d, s2=0.5, generator=g)
    x = truth.sample(4, generator=g)[0]
    chains = 5000
    model = ALMOND(data_dim=D, latent_dim=d, net={"kind": "mlp", "hidden_dims": []},
                   likelihood={"kind": "gaussian", "variance": truth.s2}, n_chains=chains,
                   sampler=MALA(0.05, 5, adapt_window=100), num_train=4)
    with torch.no_grad():
        model.model.decoder[0].weight.copy_(truth.W)
        model.model.decoder[0].bias.copy_(truth.b)
    for call in range(100):
        z, stats_ = model.e_step(x, torch.arange(4), torch.Generator().manual_seed(call))
    mean, cov = truth.posterior(x)
    var = cov.diagonal()
    centred = (z - mean).reshape(-1, d)
    n = centred.shape[0]
    ratio = (centred.T @ centred / n).diagonal() / var
    assert ((ratio - 1).abs() / math.sqrt(2 / n)).max() < 4, ratio
    assert bool((model.store.count == 500).all()) and 0.3 < float(stats_["accept_rate"]) < 0.9


def test_sampler_group_builds_the_e_step_kernel() -> None:
    """`latentlab-train model=almond sampler=mala`: the E-step kernel comes from conf/sampler/, its keys edit it."""
    from hydra.utils import instantiate

    cfg = _compose("model=almond", "sampler=mala", "sampler.n_steps=3")
    model = instantiate(cfg.model, data_dim=64, _convert_="all")
    assert isinstance(model.sampler, MALA) and model.langevin_steps == 3 and model.sampler.window() == 100
    assert isinstance(instantiate(_compose("model=almond").model, data_dim=64).sampler, ULA)
    with pytest.raises(ConfigError, match="sampler=ula"):
        ALMOND(data_dim=4, sampler=instantiate(_compose("sampler=score_ula").sampler))
