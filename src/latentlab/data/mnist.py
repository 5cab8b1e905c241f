"""MNIST and Fashion-MNIST from their original IDX gz files, and Larochelle's binarized MNIST.

Files live in `<data_dir>/mnist/`, `<data_dir>/fashion_mnist/` and `<data_dir>/binarized_mnist/`
(the layout of ../shared/data). Every file is verified (size, then md5 against the published
value) before it is parsed, so a bad file stops the run before training with the fix spelled out.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from latentlab.data.base import LatentDataModule, SplitData
from latentlab.data.download import download_file
from latentlab.data.idx import md5sum, read_idx
from latentlab.errors import ConfigError, DataError


@dataclass(frozen=True)
class DataFile:
    """A published file: its name, and the size in bytes and md5 that identify it (None: not checked)."""

    name: str
    size: int | None = None
    md5: str | None = None


class _MNISTFamily(LatentDataModule):
    """28x28 images from a directory `<data_dir>/<subdir>` holding `files`, verified before parsing."""

    subdir: ClassVar[str]
    title: ClassVar[str]  # how error messages name the dataset
    files: ClassVar[dict[str, DataFile]] = {}
    can_download: ClassVar[bool] = False

    @property
    def root(self) -> Path:
        if self.data_dir is None:
            raise ConfigError(f"data.data_dir is required for {self.name} (usually ${{paths.data_dir}}); "
                              f"point it at the directory that holds {self.subdir}/")
        return self.data_dir / self.subdir

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, 28, 28)

    @cached_property
    def _verified(self) -> set[tuple[Path, int, int]]:
        """Files already md5-checked, keyed by (path, size, mtime), so prepare_data + setup hash once."""
        return set()

    def _file_problem(self, spec: DataFile) -> str | None:
        """Why the file is unusable (missing, wrong size, wrong md5), or None if it is the published one."""
        path = self.root / spec.name
        if not path.is_file():
            return "missing"
        stat = path.stat()
        if spec.size is not None and stat.st_size != spec.size:
            return f"has {stat.st_size} bytes, expected {spec.size} (truncated or corrupted)"
        if spec.md5 is not None and (key := (path, stat.st_size, stat.st_mtime_ns)) not in self._verified:
            if (digest := md5sum(path)) != spec.md5:
                return f"has md5 {digest}, expected {spec.md5} (corrupted)"
            self._verified.add(key)
        return None

    def _prepare_files(self) -> None:
        for spec in self.files.values():
            problem = self._file_problem(spec)
            if problem is not None and self.download and self.can_download:
                self._download(spec)
                problem = self._file_problem(spec)
            if problem is None:
                continue
            if problem == "missing":
                where = (f"{self.title} directory {self.root} does not exist" if not self.root.is_dir()
                         else f"{self.title} file {self.root / spec.name} not found")
                names = ", ".join(f.name for f in self.files.values())
                fix = " or set data.download=true" if self.can_download else ""
                raise DataError(f"{where} (paths.data_dir={self.data_dir}); copy the dataset there "
                                f"({names} in {self.root}/){fix}")
            fix = ("set data.download=true to replace it, or copy a good copy there" if self.can_download
                   else "replace it with a good copy")
            raise DataError(f"{self.title} file {self.root / spec.name} {problem}; {fix}")

    def _download(self, spec: DataFile) -> None:
        raise NotImplementedError(f"{self.name} has no download")


# --------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX gz)

_IDX_NAMES = ("train_images", "train_labels", "test_images", "test_labels")


class IDXDataModule(_MNISTFamily):
    """28x28 grey images (pixel/255) and labels 0-9 from the four original IDX gz files."""

    default_mirrors: ClassVar[tuple[str, ...]]
    can_download: ClassVar[bool] = True

    def __init__(
        self,
        data_dir: str | Path | None = None,
        batch_size: int = 100,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        binarize: str = "none",
        binarize_threshold: float | None = None,
        val_size: int | float = 5000,
        train_subset: int | None = None,
        val_subset: int | None = None,
        test_subset: int | None = None,
        seed: int | None = 0,
        split_seed: int = 0,
        download: bool = False,
        shuffle: bool = True,
        pin_memory: bool = False,
        mirrors: list[str] | None = None,
    ) -> None:
        super().__init__(data_dir, batch_size, eval_batch_size, num_workers, binarize, binarize_threshold, val_size,
                         train_subset, val_subset, test_subset, seed, split_seed, download, shuffle, pin_memory)
        self.mirrors = list(self.default_mirrors if mirrors is None else mirrors)

    def _download(self, spec: DataFile) -> None:
        assert spec.md5 is not None
        download_file(self.mirrors, spec.name, self.root / spec.name, spec.md5, size=spec.size)

    def _read_pair(self, images_key: str, labels_key: str) -> SplitData:
        images = read_idx(self.root / self.files[images_key].name)
        labels = read_idx(self.root / self.files[labels_key].name)
        n = images.shape[0]
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise DataError(f"{self.root / self.files[images_key].name}: expected uint8 (N, 28, 28) images, "
                            f"got {images.dtype} {images.shape}; replace it with the original file")
        if labels.shape != (n,) or labels.max(initial=0) > 9:
            raise DataError(f"{self.root / self.files[labels_key].name}: expected {n} labels in 0-9, "
                            f"got shape {labels.shape}; replace it with the original file")
        x = torch.from_numpy(images.reshape(n, -1).astype(np.float32)).div_(255.0)
        return SplitData(x, labels=torch.from_numpy(labels.astype(np.int64)))

    def _load_splits(self) -> dict[str, SplitData]:
        return {"train": self._read_pair("train_images", "train_labels"),
                "test": self._read_pair("test_images", "test_labels")}


def _idx_files(sizes_md5: tuple[tuple[int, str], ...]) -> dict[str, DataFile]:
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    return {key: DataFile(name, size, md5) for key, name, (size, md5) in zip(_IDX_NAMES, names, sizes_md5)}


class MNISTDataModule(IDXDataModule):
    """MNIST (LeCun, Cortes, Burges; CC BY-SA 3.0): 55k/5k/10k by default."""

    name = "mnist"
    title = "MNIST"
    subdir = "mnist"
    default_mirrors = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
    files = _idx_files(((9912422, "f68b3c2dcbeaaa9fbdd348bbdeb94873"), (28881, "d53e105ee54ea40749a09fcbcd1e9432"),
                        (1648877, "9fb629c4189551a2d022fa330f9573f3"), (4542, "ec29112dd5afa0611ce80d1b7f02629c")))


class FashionMNISTDataModule(IDXDataModule):
    """Fashion-MNIST (Zalando Research; MIT): same format and splits as MNIST."""

    name = "fashion_mnist"
    title = "Fashion-MNIST"
    subdir = "fashion_mnist"
    default_mirrors = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
    files = _idx_files(((26421880, "8d4fb7e6c68d591d4c3dfef9ec88bf0d"), (29515, "25c81989df183df01b3e8a0aad5dffbe"),
                        (4422102, "bef4ecab320f06d8554ea6380940ec79"), (5148, "bb300cfdad3c16e7a12a480ee83cd310")))


# --------------------------------------------------------------------------------------------------
# Larochelle & Murray's statically binarized MNIST (npz)


class BinarizedMNISTDataModule(_MNISTFamily):
    """The standard static binarization of MNIST (Larochelle & Murray 2011): fixed 50k/10k/10k, no labels.

    The npz was written by `np.savez_compressed`, so its md5 identifies only one copy; the content
    is checked instead: keys, shapes, values in {0, 1}, and the number of ones of every split.
    The data are binary already, hence no `binarize` and no `val_size` arguments.
    """

    name = "binarized_mnist"
    title = "binarized MNIST"
    subdir = "binarized_mnist"
    files = {"npz": DataFile("binarized_mnist.npz")}
    #: key in the npz -> (split, rows, number of ones), from ../shared/data/README.md
    content: ClassVar[dict[str, tuple[str, int, int]]] = {
        "train": ("train", 50000, 5118041), "valid": ("val", 10000, 1028036), "test": ("test", 10000, 1038896)}

    def __init__(
        self,
        data_dir: str | Path | None = None,
        batch_size: int = 100,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_subset: int | None = None,
        val_subset: int | None = None,
        test_subset: int | None = None,
        seed: int | None = 0,
        split_seed: int = 0,
        shuffle: bool = True,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(data_dir, batch_size, eval_batch_size, num_workers, train_subset=train_subset,
                         val_subset=val_subset, test_subset=test_subset, seed=seed, split_seed=split_seed,
                         shuffle=shuffle, pin_memory=pin_memory)

    def _load_splits(self) -> dict[str, SplitData]:
        path = self.root / self.files["npz"].name
        fix = "replace it with a good copy of binarized_mnist.npz"
        splits: dict[str, SplitData] = {}
        try:
            with np.load(path) as npz:
                missing = set(self.content) - set(npz.files)
                if missing:
                    raise DataError(f"{path} lacks the keys {sorted(missing)} (has {npz.files}); {fix}")
                for key, (split, rows, ones) in self.content.items():
                    arr = npz[key]
                    if arr.shape != (rows, 784):
                        raise DataError(f"{path}: '{key}' has shape {arr.shape}, expected ({rows}, 784); {fix}")
                    if arr.dtype.kind not in "biu" or arr.min() < 0 or arr.max() > 1:
                        raise DataError(f"{path}: '{key}' must hold integers in {{0, 1}} "
                                        f"(dtype {arr.dtype}, range [{arr.min()}, {arr.max()}]); {fix}")
                    if (count := int(arr.sum(dtype=np.int64))) != ones:
                        raise DataError(f"{path}: '{key}' has {count} ones, expected {ones} (corrupted); {fix}")
                    splits[split] = SplitData(torch.from_numpy(arr.astype(np.float32)))
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
            raise DataError(f"cannot read {path}: {exc}. The file is truncated or corrupted; {fix}") from exc
        return splits
