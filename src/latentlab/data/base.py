"""The one data-module contract every method and evaluator relies on.

Batches are `(x, index)`: `x` float32 flat `(batch, data_dim)`, `index` int64 `(batch,)` the
example's position in its split, so that methods can keep per-example state (ALMOND's persistent
Langevin chains). Splits are preloaded as one float32 tensor each and served by tensor indexing a
whole batch at once (`__getitems__`), so loading costs about what slicing a tensor by hand costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from latentlab.data.binarize import BINARIZE_MODES, DynamicBinarizer, static_binarize
from latentlab.data.resumable import ResumableDataLoader, ResumableSampler
from latentlab.rng import SPLIT_IDS, Stream, keyed_generator
from latentlab.errors import ConfigError, DataError

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


@dataclass
class SplitData:
    """One split: data `x` (N, D) float32, optional labels (N,) int64, optional true latents (N, d)."""

    x: Tensor
    labels: Tensor | None = None
    latents: Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def select(self, rows: Tensor | slice) -> "SplitData":
        """The same split restricted to `rows`, keeping x, labels and latents aligned."""
        pick = (lambda t: None if t is None else t[rows])
        return replace(self, x=self.x[rows], labels=pick(self.labels), latents=pick(self.latents))


class IndexedTensorDataset(Dataset):
    """Rows of one preloaded tensor, returned with their positions: a batch is a single gather."""

    def __init__(self, x: Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.x[i], i

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """Whole batch at once (torch's DataLoader calls this instead of `__getitem__` per item). `index_select`
        copies whole rows (15 us for 128 MNIST rows); `x[index]` gathers element by element (75 us)."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        return self.x.index_select(0, index), index


def collate_batch(batch: Any) -> Any:
    """Pass through batches that `__getitems__` already built; collate lists of items as torch does."""
    return batch if isinstance(batch, tuple) else default_collate(batch)


def check_int(key: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    """Raise `ConfigError` naming `data.<key>` unless `value` is an int >= minimum (or None if allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or null" if allow_none else "")
        raise ConfigError(f"data.{key} must be {allowed}, got {value!r}")


class LatentDataModule(L.LightningDataModule):
    """Base of all latentlab data modules: argument checks, splits, subsets, binarization, loaders.

    Subclasses give `name`, `data_dim`, optionally `image_shape`, and `_load_splits()` (returning
    "train" and "test", and "val" when the dataset has its own); file-backed ones also
    `_prepare_files()`, which checks (and, with `download=True`, fetches) files before any parsing.

    Splits: when the dataset has no validation split, the first `val_size` examples of the training
    file become it (an int count, or a float fraction), as TensorFlow's `read_data_sets` did for the
    AVB code (MNIST 55k/5k). `train_subset`/`val_subset`/`test_subset` keep a random subset drawn
    with `split_seed`, which is separate from `seed` so that runs with different seeds are judged
    on the same examples.

    Binarization (`binarize`): "none" keeps grey levels; "static" binarizes every split once
    (`x > binarize_threshold` if given, else one Bernoulli sample keyed on `seed`); "dynamic" draws
    fresh Bernoulli(x) training data every epoch keyed on (`seed`, epoch, example), while val and
    test get one fixed draw so their metrics compare across epochs.

    Why dynamic binarization lives in `on_before_batch_transfer` rather than in the dataset: the
    epoch must come from one authoritative place. The trainer's `current_epoch` is checkpointed and
    restored on resume, is the same on every DDP process, and is read in the main process, so it is
    unaffected by the DistributedSampler Lightning injects (whose `set_epoch` never reaches our
    dataset), by worker processes (which hold stale copies of a dataset), and by batch order. The
    train loader therefore yields grey levels in dynamic mode; outside a Trainer call
    `binarize_batch(batch, epoch)` yourself. A LightningModule used with these data modules must not
    override `on_before_batch_transfer` (Lightning would run only the data module's).
    """

    name: ClassVar[str] = "base"
    #: Whether `binarize` makes sense (data are grey levels in [0, 1]).
    binarizable: ClassVar[bool] = True

    def __init__(
        self,
        data_dir: str | Path | None = None,
        batch_size: int = 100,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        binarize: str = "none",
        binarize_threshold: float | None = None,
        val_size: int | float = 0,
        train_subset: int | None = None,
        val_subset: int | None = None,
        test_subset: int | None = None,
        seed: int | None = 0,
        split_seed: int = 0,
        download: bool = False,
        shuffle: bool = True,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_int("batch_size", batch_size, 1)
        check_int("eval_batch_size", eval_batch_size, 1, allow_none=True)
        check_int("num_workers", num_workers, 0)
        check_int("seed", seed, 0, allow_none=True)
        check_int("split_seed", split_seed, 0)
        for key, value in (("train_subset", train_subset), ("val_subset", val_subset), ("test_subset", test_subset)):
            check_int(key, value, 1, allow_none=True)
        if binarize not in BINARIZE_MODES:
            raise ConfigError(f"data.binarize must be one of {list(BINARIZE_MODES)}, got {binarize!r}")
        if binarize != "none" and not self.binarizable:
            raise ConfigError(f"data.binarize must be 'none' for {self.name}: its data are not grey levels in [0, 1]")
        if binarize_threshold is not None:
            if binarize != "static":
                raise ConfigError(f"data.binarize_threshold is only used with data.binarize=static, "
                                  f"got binarize={binarize!r}; remove the threshold or set binarize=static")
            if not 0.0 <= binarize_threshold < 1.0:
                raise ConfigError(f"data.binarize_threshold must be in [0, 1), got {binarize_threshold!r}")
        if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
            raise ConfigError(f"data.val_size must be an int count or a float fraction, got {val_size!r}")
        if val_size < 0 or (isinstance(val_size, float) and val_size >= 1.0):
            raise ConfigError(f"data.val_size must be an int >= 0 or a fraction in [0, 1), got {val_size!r}")
        self.data_dir = None if data_dir is None else Path(data_dir).expanduser()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.binarize = binarize
        self.binarize_threshold = binarize_threshold
        self.val_size = val_size
        self.subsets: dict[str, int | None] = {"train": train_subset, "val": val_subset, "test": test_subset}
        self.seed = seed or 0  # an unseeded run (seed=null) still binarizes reproducibly
        self.split_seed = split_seed
        self.download = download
        self.shuffle = shuffle
        self.pin_memory = pin_memory
        self._splits: dict[str, SplitData] | None = None
        self._dynamic: DynamicBinarizer | None = None

    # ---- what subclasses provide ---------------------------------------------------------------
    @property
    def data_dim(self) -> int:
        """Length of a flat example; known before `setup` (models are built from it)."""
        if self.image_shape is None:
            raise NotImplementedError(f"{type(self).__name__} must define data_dim or image_shape")
        return math.prod(self.image_shape)

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """(channels, height, width) for conv nets and pictures; None for non-image data."""
        return None

    def _load_splits(self) -> dict[str, SplitData]:
        """Parsed splits: "train", "test" and, if the dataset fixes one, "val"."""
        raise NotImplementedError(f"{type(self).__name__} must implement _load_splits")

    def _prepare_files(self) -> None:
        """Check (and with `download=True` fetch) the files; raise `DataError` naming the fix."""

    # ---- Lightning hooks -----------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Runs once per node before `setup`: the place for downloads."""
        self._prepare_files()

    def setup(self, stage: str | None = None) -> None:
        """Verify files, load, split, subset and binarize every split once (idempotent)."""
        if self._splits is not None:
            return
        self._prepare_files()
        splits = self._carve_validation(self._load_splits())
        splits = {name: self._subset(name, data) for name, data in splits.items()}
        for name, data in splits.items():
            self._check_split(name, data)
        self._splits = self._apply_binarization(splits)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Dynamic binarization of training batches, keyed on the trainer's epoch (see class doc)."""
        trainer = self.trainer
        if self._dynamic is not None and trainer is not None and trainer.training:
            return self.binarize_batch(batch, trainer.current_epoch)
        return batch

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch by a keyed stream and resumable mid-epoch (`latentlab.data.resumable`)."""
        trainer = self.trainer  # under DDP each rank takes its share of the one keyed order
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(self.num_train, self.seed, shuffle=self.shuffle, num_replicas=world, rank=rank)
        return self._loader("train", self.batch_size, sampler=sampler, position=self._train_position)

    def _train_position(self) -> tuple[int, int]:
        """(epoch, batches of it done) of the trainer's fit loop: what a checkpoint written now resumes at."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done >= trainer.num_training_batches:  # the epoch is over: resume at the start of the next one
            return trainer.current_epoch + 1, 0
        return trainer.current_epoch, done

    def val_dataloader(self) -> DataLoader | list:
        """The validation loader, or [] when `val_size` is 0 (Lightning then skips validation)."""
        return self._loader("val", self.eval_batch_size) if self.num_val else []

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test", self.eval_batch_size) if self.num_test else []

    # ---- public API ----------------------------------------------------------------------------
    def binarize_batch(self, batch: tuple[Tensor, Tensor], epoch: int) -> tuple[Tensor, Tensor]:
        """A training batch `(x, index)` as dynamic binarization serves it at `epoch` (identity otherwise)."""
        self.setup()
        if self._dynamic is None:
            return batch
        x, index = batch  # x's dtype too: Lightning has already cast the batch under trainer.precision=bf16-true|16-true
        return self._dynamic(index, epoch).to(device=x.device, dtype=x.dtype), index

    def data(self, split: Split) -> Tensor:
        """All of a split's x (N, D); in dynamic mode the train split holds the grey levels (probabilities)."""
        return self._split(split).x

    def labels(self, split: Split) -> Tensor | None:
        return self._split(split).labels

    def latents(self, split: Split) -> Tensor | None:
        """Ground-truth latents of synthetic data (None for real data)."""
        return self._split(split).latents

    def num_examples(self, split: Split) -> int:
        return len(self._split(split))

    @property
    def num_train(self) -> int:
        """N of the train split (ALMOND allocates chains x N x d); loads the data if needed."""
        return self.num_examples("train")

    @property
    def num_val(self) -> int:
        return self.num_examples("val")

    @property
    def num_test(self) -> int:
        return self.num_examples("test")

    @property
    def train_labels(self) -> Tensor | None:
        return self.labels("train")

    @property
    def val_labels(self) -> Tensor | None:
        return self.labels("val")

    @property
    def test_labels(self) -> Tensor | None:
        return self.labels("test")

    @property
    def true_latents(self) -> Tensor | None:
        """Ground-truth latents of the train split (synthetic data only)."""
        return self.latents("train")

    # ---- internals -----------------------------------------------------------------------------
    def _split(self, split: str) -> SplitData:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.setup()
        assert self._splits is not None
        return self._splits[split]

    def _loader(self, split: str, batch_size: int, **kwargs: Any) -> DataLoader:
        """In order unless a sampler is given; never draws from the global random stream (own generator)."""
        return ResumableDataLoader(
            IndexedTensorDataset(self._split(split).x),
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_batch,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def _carve_validation(self, splits: dict[str, SplitData]) -> dict[str, SplitData]:
        if "val" in splits:
            return splits
        pool = splits["train"]
        n = len(pool)
        n_val = round(self.val_size * n) if isinstance(self.val_size, float) else self.val_size
        if not 0 <= n_val < n:
            raise ConfigError(f"data.val_size={self.val_size!r} must leave training examples: the {self.name} "
                              f"training file has {n}, so use 0 <= val_size < {n}")
        return {"train": pool.select(slice(n_val, None)), "val": pool.select(slice(0, n_val)), "test": splits["test"]}

    def _subset(self, split: str, data: SplitData) -> SplitData:
        k = self.subsets[split]
        if k is None:
            return data
        if k > len(data):
            raise ConfigError(f"data.{split}_subset={k} exceeds the {len(data)} examples of the {self.name} "
                              f"{split} split; use a smaller value or null")
        gen = keyed_generator(self.split_seed, Stream.SUBSET, SPLIT_IDS[split])
        rows = torch.randperm(len(data), generator=gen)[:k].sort().values
        return data.select(rows)

    def _check_split(self, split: str, data: SplitData) -> None:
        """Catch loader bugs and odd files before training: shape, dtype, range, aligned labels."""
        x = data.x
        where = f"{self.name} {split} split"
        if x.dtype != torch.float32 or x.ndim != 2 or x.shape[1] != self.data_dim:
            raise DataError(f"{where}: expected float32 (N, {self.data_dim}), got {x.dtype} {tuple(x.shape)}")
        if x.numel() and not torch.isfinite(x).all():
            raise DataError(f"{where} contains NaN or inf values")
        if self.binarize != "none" and x.numel() and (x.min() < 0 or x.max() > 1):
            raise DataError(f"{where}: binarization needs values in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
        for what, t in (("labels", data.labels), ("latents", data.latents)):
            if t is not None and t.shape[0] != x.shape[0]:
                raise DataError(f"{where}: {t.shape[0]} {what} for {x.shape[0]} examples")

    def _apply_binarization(self, splits: dict[str, SplitData]) -> dict[str, SplitData]:
        if self.binarize == "none":
            return splits
        out = dict(splits)
        for split, data in splits.items():
            if self.binarize == "dynamic" and split == "train":
                self._dynamic = DynamicBinarizer(data.x, self.seed)
                continue
            x = static_binarize(data.x, self.seed, SPLIT_IDS[split], self.binarize_threshold)
            out[split] = replace(data, x=x)
        return out
