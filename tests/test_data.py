"""Data modules: the (x, index) contract, splits, file verification, argument checks, binarization.

Statistical checks use tolerances of K_SE standard errors of the quantity tested, derived from the
Bernoulli / Gaussian variances, with fixed seeds (a correct implementation fails with prob. < 1e-6).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DistributedSampler

from latentlab.analytic import ppca_max_log_likelihood
from latentlab.data import (
    AVBToyDataModule,
    BinarizedMNISTDataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    LinearGaussianDataModule,
    MNISTDataModule,
    NormalMeansDataModule,
)
from latentlab.data.binarize import DynamicBinarizer
from latentlab.data.idx import read_idx
from latentlab.errors import ConfigError, DataError
from trainers import quiet_trainer

K_SE = 5.0


def one_epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, idx = zip(*loader)
    return torch.cat(xs), torch.cat(idx)


def link_dataset(src: Path, dst: Path) -> None:
    """A copy of a dataset folder made of symlinks to the read-only originals (edit only what you replace)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)


@pytest.fixture(scope="module")
def mnist(shared_data_dir: Path) -> MNISTDataModule:
    dm = MNISTDataModule(data_dir=shared_data_dir, batch_size=100)
    dm.prepare_data()
    dm.setup("fit")
    return dm


# ---- the (x, index) contract and splits ------------------------------------------------------------

def test_mnist_splits_and_batches(mnist: MNISTDataModule, shared_data_dir: Path) -> None:
    assert (mnist.num_train, mnist.num_val, mnist.num_test) == (55000, 5000, 10000)
    assert mnist.data_dim == 784 and mnist.image_shape == (1, 28, 28) and mnist.name == "mnist"
    x, index = next(iter(mnist.train_dataloader()))
    assert x.shape == (100, 784) and x.dtype == torch.float32
    assert index.shape == (100,) and index.dtype == torch.int64
    assert torch.equal(x, mnist.data("train")[index])
    # grey levels are pixel/255 exactly; validation is the first 5000 training images (TF/AVB split)
    raw = read_idx(shared_data_dir / "mnist" / "train-images-idx3-ubyte.gz")
    assert torch.equal(mnist.data("val"), torch.from_numpy(raw[:5000].reshape(5000, -1).astype(np.float32)) / 255)
    assert torch.equal(mnist.data("train")[0], torch.from_numpy(raw[5000].reshape(-1).astype(np.float32)) / 255)
    labels = read_idx(shared_data_dir / "mnist" / "train-labels-idx1-ubyte.gz")
    assert torch.equal(mnist.train_labels, torch.from_numpy(labels[5000:].astype(np.int64)))
    assert mnist.test_labels.shape == (10000,) and set(mnist.test_labels.unique().tolist()) == set(range(10))


def test_train_epoch_visits_every_index_once_and_eval_is_ordered(mnist: MNISTDataModule) -> None:
    _, index = one_epoch(mnist.train_dataloader())
    assert torch.equal(index.sort().values, torch.arange(55000))
    assert not torch.equal(index, torch.arange(55000))  # shuffled
    x, index = one_epoch(mnist.test_dataloader())
    assert torch.equal(index, torch.arange(10000)) and torch.equal(x, mnist.data("test"))


def test_fashion_mnist_loads(shared_data_dir: Path) -> None:
    dm = FashionMNISTDataModule(data_dir=shared_data_dir, train_subset=1000)
    assert (dm.num_train, dm.num_val, dm.num_test) == (1000, 5000, 10000)
    x = dm.data("test")
    assert x.dtype == torch.float32 and x.shape == (10000, 784) and 0 <= x.min() and x.max() == 1
    assert dm.name == "fashion_mnist" and dm.test_labels.max() == 9


def test_binarized_mnist_splits(shared_data_dir: Path) -> None:
    dm = BinarizedMNISTDataModule(data_dir=shared_data_dir)
    assert (dm.num_train, dm.num_val, dm.num_test) == (50000, 10000, 10000)
    for split, ones in (("train", 5118041), ("val", 1028036), ("test", 1038896)):
        x = dm.data(split)
        assert x.dtype == torch.float32 and x.shape[1] == 784
        assert bool(((x == 0) | (x == 1)).all()) and int(x.sum()) == ones
    assert dm.train_labels is None and dm.image_shape == (1, 28, 28)
    x, index = next(iter(dm.val_dataloader()))
    assert torch.equal(x, dm.data("val")[index]) and torch.equal(index, torch.arange(100))


def test_digits_default_split_is_fixed_and_disjoint() -> None:
    dm = DigitsDataModule()
    assert (dm.num_train, dm.num_val, dm.num_test) == (1297, 200, 300) and dm.data_dim == 64
    x = torch.cat([dm.data(s) for s in ("train", "val", "test")])
    assert x.min() == 0 and x.max() == 1 and torch.equal((x * 16).round(), x * 16)  # pixel/16
    from sklearn.datasets import load_digits
    # the three splits partition the 1797 digits: same multiset of (row, label) as the original
    ref = torch.as_tensor(load_digits().data, dtype=torch.float32) / 16
    assert torch.equal(x.sum(0), ref.sum(0)) and x.shape == ref.shape
    other = DigitsDataModule(seed=7)  # the split ignores the training seed
    assert torch.equal(other.data("test"), dm.data("test"))
    assert not torch.equal(DigitsDataModule(split_seed=1).data("test"), dm.data("test"))


def test_subsets_are_seeded_and_keep_labels_aligned() -> None:
    full = DigitsDataModule()
    sub = DigitsDataModule(train_subset=100, test_subset=50)
    assert (sub.num_train, sub.num_val, sub.num_test) == (100, 200, 50)
    assert torch.equal(DigitsDataModule(train_subset=100).data("train"), sub.data("train"))
    match = (sub.data("train")[:, None, :] == full.data("train")[None]).all(-1)  # (100, 1297)
    rows = match.float().argmax(1)
    assert match.any(1).all() and torch.equal(full.train_labels[rows], sub.train_labels)


def test_val_size_fraction_and_empty_validation() -> None:
    assert DigitsDataModule(val_size=0.1).num_val == round(0.1 * 1497)
    dm = DigitsDataModule(val_size=0)
    assert dm.num_val == 0 and dm.val_dataloader() == [] and dm.num_train == 1497


# ---- files: verification before training ------------------------------------------------------------

def test_corrupted_copy_fails_md5(tmp_path: Path, shared_data_dir: Path) -> None:
    link_dataset(shared_data_dir / "mnist", tmp_path / "mnist")
    target = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    data = bytearray((shared_data_dir / "mnist" / target.name).read_bytes())
    data[-10] ^= 0xFF  # same size, one byte flipped
    target.unlink()
    target.write_bytes(bytes(data))
    with pytest.raises(DataError, match="md5") as err:
        MNISTDataModule(data_dir=tmp_path).setup()
    assert str(target) in str(err.value) and "data.download=true" in str(err.value)


def test_truncated_gz_is_a_data_error(tmp_path: Path, shared_data_dir: Path) -> None:
    link_dataset(shared_data_dir / "mnist", tmp_path / "mnist")
    target = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    data = (shared_data_dir / "mnist" / target.name).read_bytes()
    target.unlink()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated"):
        MNISTDataModule(data_dir=tmp_path).setup()
    with pytest.raises(DataError, match="truncated"):  # the parser alone also refuses it
        read_idx(target)


def test_missing_directory_and_file_name_path_and_fix(tmp_path: Path, shared_data_dir: Path) -> None:
    with pytest.raises(DataError) as err:
        MNISTDataModule(data_dir=tmp_path).setup()
    msg = str(err.value)
    assert str(tmp_path / "mnist") in msg and "does not exist" in msg and "data.download=true" in msg
    link_dataset(shared_data_dir / "mnist", tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz not found") as err:
        MNISTDataModule(data_dir=tmp_path).prepare_data()
    assert f"paths.data_dir={tmp_path}" in str(err.value)
    with pytest.raises(DataError, match="binarized_mnist.npz"):
        BinarizedMNISTDataModule(data_dir=tmp_path).setup()


def test_binarized_mnist_content_is_checked(tmp_path: Path, shared_data_dir: Path) -> None:
    src = shared_data_dir / "binarized_mnist" / "binarized_mnist.npz"
    (tmp_path / "binarized_mnist").mkdir()
    dst = tmp_path / "binarized_mnist" / "binarized_mnist.npz"
    with np.load(src) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["valid"] = arrays["valid"].copy()
    arrays["valid"][0, 0] ^= 1  # one flipped pixel: still {0, 1}, one more or less 1
    np.savez(dst, **arrays)
    with pytest.raises(DataError, match="'valid' has 102803[57] ones, expected 1028036"):
        BinarizedMNISTDataModule(data_dir=tmp_path).setup()
    dst.write_bytes(src.read_bytes()[:100000])
    with pytest.raises(DataError, match="truncated or corrupted"):
        BinarizedMNISTDataModule(data_dir=tmp_path).setup()


# ---- argument checks ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "data.batch_size must be an integer >= 1, got 0"),
        ({"eval_batch_size": -1}, "data.eval_batch_size"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"binarize": "sometimes"}, "data.binarize must be one of"),
        ({"binarize": "dynamic", "binarize_threshold": 0.5}, "only used with data.binarize=static"),
        ({"binarize": "static", "binarize_threshold": 1.5}, r"data.binarize_threshold must be in \[0, 1\)"),
        ({"val_size": -1}, "data.val_size"),
        ({"val_size": 1.5}, "data.val_size"),
        ({"val_size": "5000"}, "data.val_size"),
        ({"train_subset": 0}, "data.train_subset"),
        ({"seed": -1}, "data.seed"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DigitsDataModule(**kwargs)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: DigitsDataModule(val_size=1497), r"data.val_size=1497 must leave training examples.*< 1497"),
        (lambda: DigitsDataModule(test_subset=301), "data.test_subset=301 exceeds the 300 examples"),
        (lambda: MNISTDataModule(data_dir=None), "data.data_dir is required"),
        (lambda: NormalMeansDataModule(prior="cauchy"), "data.prior must be one of"),
        (lambda: LinearGaussianDataModule(noise_var=0.0), "data.noise_var"),
        (lambda: AVBToyDataModule(num_train=0), "data.num_train"),
    ],
)
def test_impossible_values_raise_config_error_before_training(make, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make().setup()


# ---- binarization ----------------------------------------------------------------------------------

def test_dynamic_binarization_statistics_and_keys(mnist: MNISTDataModule) -> None:
    p = mnist.data("train")[:5000]  # 3.9M pixels: ample power, cheap
    binarizer = DynamicBinarizer(p, seed=3)
    everyone = torch.arange(p.shape[0])
    b0, b1 = binarizer(everyone, epoch=0), binarizer(everyone, epoch=1)
    assert set(b0.unique().tolist()) == {0.0, 1.0}
    # E[b] = p: the sum of all draws is within K_SE of the sum of grey levels (var = sum p(1-p))
    var = (p * (1 - p)).sum().double()
    assert abs((b0 - p).sum().double()) < K_SE * var.sqrt()
    assert torch.equal(b0[p == 0], torch.zeros_like(p[p == 0])) and bool((b0[p == 1] == 1).all())
    # epochs draw independently: entries differ with prob. q = 2p(1-p)
    q = 2 * p * (1 - p)
    differ = (b0 != b1).sum().double()
    assert abs(differ - q.sum()) < K_SE * (q * (1 - q)).sum().double().sqrt()
    # the same (seed, epoch, example) gives the same draw, whatever the batch or instance
    rows = torch.tensor([4999, 3, 2000, 3])
    again = DynamicBinarizer(p, seed=3)
    assert torch.equal(again(rows, epoch=1), b1[rows])
    assert torch.equal(again(rows[:2], epoch=0), b0[rows[:2]])
    assert not torch.equal(DynamicBinarizer(p, seed=4)(rows, epoch=1), b1[rows])


def test_dynamic_mode_datamodule_keys_and_fixed_eval_splits() -> None:
    dm, twin, grey = (DigitsDataModule(binarize="dynamic", seed=1), DigitsDataModule(binarize="dynamic", seed=1),
                      DigitsDataModule())
    assert torch.equal(dm.data("train"), grey.data("train"))  # train holds probabilities
    x, index = next(iter(dm.train_dataloader()))
    e2 = dm.binarize_batch((x, index), epoch=2)[0]
    assert set(e2.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(e2[:5], twin.binarize_batch((x[:5], index[:5]), epoch=2)[0])
    assert not torch.equal(e2, dm.binarize_batch((x, index), epoch=3)[0])
    # a batch Lightning has already cast (bf16 under trainer.precision=bf16-true in latentlab-cli) keeps its dtype
    cast = dm.binarize_batch((x.to(torch.bfloat16), index), epoch=2)[0]
    assert cast.dtype == torch.bfloat16 and torch.equal(cast.float(), e2)
    for split in ("val", "test"):  # one fixed draw, same for every instance with this seed
        v = dm.data(split)
        assert set(v.unique().tolist()) == {0.0, 1.0} and torch.equal(v, twin.data(split))
        p = grey.data(split)
        assert abs((v - p).sum()) < K_SE * (p * (1 - p)).sum().sqrt()
    assert not torch.equal(DigitsDataModule(binarize="dynamic", seed=2).data("test"), dm.data("test"))


def test_static_binarization_threshold_and_draw() -> None:
    grey = DigitsDataModule()
    thresholded = DigitsDataModule(binarize="static", binarize_threshold=0.5)
    for split in ("train", "val", "test"):
        assert torch.equal(thresholded.data(split), (grey.data(split) > 0.5).float())
    drawn, twin = DigitsDataModule(binarize="static", seed=5), DigitsDataModule(binarize="static", seed=5)
    assert torch.equal(drawn.data("train"), twin.data("train"))
    p = grey.data("train")
    assert abs((drawn.data("train") - p).sum()) < K_SE * (p * (1 - p)).sum().sqrt()
    x, index = next(iter(drawn.train_dataloader()))
    assert torch.equal(drawn.binarize_batch((x, index), epoch=4)[0], x)  # static data never change


class _Recorder(L.LightningModule):
    """Records what training and validation steps receive."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[str, int, torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, index = batch
        self.seen.append(("train", self.current_epoch, x.clone(), index.clone()))
        return (self.w - x.mean()) ** 2

    def validation_step(self, batch, batch_idx):
        self.seen.append(("val", self.current_epoch, batch[0].clone(), batch[1].clone()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(dm: L.LightningDataModule, epochs: int, tmp_path: Path) -> _Recorder:
    model = _Recorder()
    trainer = quiet_trainer(max_epochs=epochs, limit_train_batches=3, limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    return model


def test_trainer_sees_dynamic_binarization_keyed_on_its_epoch(tmp_path: Path) -> None:
    dm = DigitsDataModule(binarize="dynamic", seed=11)
    model = _fit(dm, epochs=2, tmp_path=tmp_path)
    reference = DigitsDataModule(binarize="dynamic", seed=11)  # a fresh process, as after a resume
    train = [s for s in model.seen if s[0] == "train"]
    assert [s[1] for s in train] == [0, 0, 0, 1, 1, 1]
    for _, epoch, x, index in train:
        assert torch.equal(x, reference.binarize_batch((x, index), epoch)[0])
    val = [s for s in model.seen if s[0] == "val"]
    assert val and all(torch.equal(x, reference.data("val")[index]) for _, _, x, index in val)
    _fit(DigitsDataModule(val_size=0), epochs=1, tmp_path=tmp_path)  # no validation split: skipped


def test_loader_survives_lightning_distributed_sampler_injection() -> None:
    """Lightning re-creates our DataLoader with a DistributedSampler under DDP (`use_distributed_sampler`)."""
    from lightning.pytorch.utilities.data import _update_dataloader

    dm = DigitsDataModule(binarize="dynamic")
    loader = dm.train_dataloader()
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(1)
        ddp_loader = _update_dataloader(loader, sampler)
        assert ddp_loader.collate_fn is loader.collate_fn and ddp_loader.batch_size == loader.batch_size
        for x, index in ddp_loader:
            assert torch.equal(x, dm.data("train")[index])
            seen.append(index)
    assert set(torch.cat(seen).tolist()) == set(range(dm.num_train))


def test_hparams_record_subclass_arguments() -> None:
    dm = MNISTDataModule(data_dir="somewhere", mirrors=["http://127.0.0.1:1/"], val_size=0.5)
    assert dm.hparams["mirrors"] == ["http://127.0.0.1:1/"] and dm.hparams["val_size"] == 0.5
    assert dm.mirrors == ["http://127.0.0.1:1/"]


# ---- synthetic data ----------------------------------------------------------------------------------

def test_avb_toy_cycles_the_four_one_hot_points() -> None:
    dm = AVBToyDataModule(num_train=1000)
    x, labels = dm.data("train"), dm.train_labels
    assert x.shape == (1000, 4) and torch.equal(x.sum(1), torch.ones(1000))
    assert torch.equal(x.argmax(1), labels) and torch.equal(labels, torch.arange(1000) % 4)
    assert torch.equal(dm.data("test"), torch.eye(4))
    x, index = next(iter(dm.train_dataloader()))
    assert x.shape == (512, 4) and torch.equal(x.argmax(1), index % 4)


def test_linear_gaussian_matches_its_true_model() -> None:
    dm = LinearGaussianDataModule(data_dim=5, latent_dim=2, noise_var=0.5, num_train=4000, data_seed=3)
    x, z = dm.data("train"), dm.true_latents
    assert x.shape == (4000, 5) and z.shape == (4000, 2) and dm.num_test == 500
    model = dm.true_model
    cov = model.W @ model.W.T + 0.5 * torch.eye(5)
    emp = torch.cov(x.T.double()).float()
    # sample covariance entries: var = (S_ii S_jj + S_ij^2) / n for Gaussian data
    se = ((cov.diag()[:, None] * cov.diag()[None] + cov**2) / 4000).sqrt()
    assert ((emp - cov).abs() < K_SE * se).all()
    # residual noise x - W z - b has variance noise_var in every dim: var(s2 * chi2_1 / n) = 2 s2^2 / n
    resid = x - z @ model.W.T - model.b
    assert ((resid.var(0) - 0.5).abs() < K_SE * math.sqrt(2 * 0.25 / 4000)).all()
    # the ML fit can only beat the true model on the data it was fitted to
    assert ppca_max_log_likelihood(x, 2) >= model.log_marginal(x).mean().item() - 1e-4
    again = LinearGaussianDataModule(data_dim=5, latent_dim=2, noise_var=0.5, num_train=4000, data_seed=3)
    assert torch.equal(again.data("test"), dm.data("test"))


@pytest.mark.parametrize(("prior", "mean", "var"), [("normal", 2.0, 0.5), ("exponential", 2.0, 4.0),
                                                    ("mixture", 1.8, 0.25 + 0.4 * 0.6 * 9.0)])
def test_normal_means_follow_the_papers_priors(prior: str, mean: float, var: float) -> None:
    dm = NormalMeansDataModule(prior=prior, num_train=1000, num_test=4000)
    assert (dm.num_train, dm.num_val, dm.num_test) == (1000, 0, 4000)
    mu, x = torch.cat([dm.true_latents, dm.latents("test")]), torch.cat([dm.data("train"), dm.data("test")])
    assert x.shape == (5000, 1) and mu.shape == (5000, 1)
    n = x.shape[0]
    assert abs(mu.mean() - mean) < K_SE * math.sqrt(var / n)
    noise = x - mu  # N(0, 1), independent of mu
    assert abs(noise.mean()) < K_SE / math.sqrt(n) and abs(noise.var() - 1) < K_SE * math.sqrt(2 / n)
    if prior == "exponential":
        assert mu.min() >= 0
    # log_marginal is the exact log p(x): it integrates to 1 and agrees with a Monte Carlo estimate
    grid = torch.linspace(-12, 25, 20001).unsqueeze(1)
    assert abs(torch.trapezoid(dm.log_marginal(grid).exp(), grid.squeeze(1)) - 1) < 1e-4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        draws = dm.prior_distribution().sample((200000,)).double()
    points = torch.tensor([[-1.0], [1.5], [4.0]])
    w = torch.exp(-0.5 * (points.double() - draws[None]) ** 2) / math.sqrt(2 * math.pi)  # (3, K)
    mc, se = w.mean(1).log(), w.std(1) / w.mean(1) / math.sqrt(draws.shape[0])  # delta method
    assert ((dm.log_marginal(points).double() - mc).abs() < K_SE * se).all()


# ---- configs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "cls"),
    [("digits", DigitsDataModule), ("mnist", MNISTDataModule), ("fashion_mnist", FashionMNISTDataModule),
     ("binarized_mnist", BinarizedMNISTDataModule), ("avb_toy", AVBToyDataModule),
     ("linear_gaussian", LinearGaussianDataModule), ("normal_means", NormalMeansDataModule)],
)
def test_configs_instantiate(name: str, cls: type, repo_root: Path) -> None:
    cfg = OmegaConf.load(repo_root / "conf" / "data" / f"{name}.yaml")
    root = OmegaConf.create({"paths": {"data_dir": "/some/data"}, "seed": 42, "data": cfg})
    dm = instantiate(root.data)
    assert type(dm) is cls and dm.name == name
    if "data_dir" in cfg:
        assert dm.data_dir == Path("/some/data")
    if "seed" in cfg:
        assert dm.seed == 42
    if name == "mnist":
        assert dm.val_size == 5000 and dm.binarize == "dynamic" and dm.mirrors[0].startswith("https://ossci")
