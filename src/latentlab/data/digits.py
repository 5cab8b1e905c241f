"""scikit-learn's 8x8 handwritten digits: the default dataset, shipped offline, a VAE trains in a minute."""

from __future__ import annotations

import torch

from latentlab.data.base import LatentDataModule, SplitData
from latentlab.rng import Stream, keyed_generator


class DigitsDataModule(LatentDataModule):
    """1797 8x8 digits (UCI optdigits via `sklearn.datasets.load_digits`), pixels/16 in [0, 1], labels 0-9.

    The split is fixed and independent of `seed`: a permutation drawn with `split_seed` puts the
    last `num_test` (300) examples in the test split and the first `val_size` (200) of the rest in
    validation, giving 1297/200/300. The file's order is by writer, hence the permutation.
    """

    name = "digits"
    num_test_examples = 300

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        binarize: str = "none",
        binarize_threshold: float | None = None,
        val_size: int | float = 200,
        train_subset: int | None = None,
        val_subset: int | None = None,
        test_subset: int | None = None,
        seed: int | None = 0,
        split_seed: int = 0,
        shuffle: bool = True,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(None, batch_size, eval_batch_size, num_workers, binarize, binarize_threshold, val_size,
                         train_subset, val_subset, test_subset, seed, split_seed, False, shuffle, pin_memory)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, 8, 8)

    def _load_splits(self) -> dict[str, SplitData]:
        from sklearn.datasets import load_digits  # lazy: importing sklearn costs ~1 s

        bunch = load_digits()
        x = torch.as_tensor(bunch.data, dtype=torch.float32).div_(16.0)
        labels = torch.as_tensor(bunch.target, dtype=torch.int64)
        order = torch.randperm(x.shape[0], generator=keyed_generator(self.split_seed, Stream.SPLIT_PERMUTATION))
        data = SplitData(x[order], labels=labels[order])
        cut = x.shape[0] - self.num_test_examples
        return {"train": data.select(slice(0, cut)), "test": data.select(slice(cut, None))}
