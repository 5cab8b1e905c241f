"""Domain classifiers: the feature networks behind FID / KID / IS / precision-recall.

No Inception weights can be downloaded here, and Inception features of 28x28 digits are a poor
yardstick anyway, so each dataset gets its own small classifier (the usual practice for MNIST-like
data). Its penultimate layer is the feature space, its softmax the p(y|x) of the Inception Score,
and its test accuracy is reported with every score: a distance measured with a bad feature
network means nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_accuracy

from latentlab.data.idx import read_idx
from latentlab.errors import DataError
from latentlab.files import atomic_file
from latentlab.nets import MLP, ConvEncoder
from latentlab.progress import progress
from latentlab.rng import seeded_global_rng

log = logging.getLogger(__name__)

#: (x_train, y_train, x_test, y_test): flat float x in [0, 1], int64 labels.
Splits = tuple[Tensor, Tensor, Tensor, Tensor]
CACHE_VERSION = 1


def _uses_conv(image_shape: Sequence[int] | None, channels: Sequence[int]) -> bool:
    """Square images whose side survives the stride-2 convs exactly (28 -> 14 -> 7) get a conv net."""
    if image_shape is None or len(image_shape) != 3:
        return False
    _, h, w = image_shape
    return h == w and h % (2 ** len(channels)) == 0 and h >= 2 ** len(channels)


class DomainClassifier(nn.Module):
    """Flat x (batch, data_dim) in [0, 1] -> `features(x)` (batch, feature_dim) -> `forward(x)` logits.

    A stride-2 conv stack (`latentlab.nets.ConvEncoder`) for square images, an MLP otherwise; the
    features are the ReLU'd penultimate layer (non-negative, like Inception's pool3 features).
    `test_accuracy` is a buffer, so the accuracy travels with the weights into every report.
    """

    def __init__(self, data_dim: int, num_classes: int, image_shape: Sequence[int] | None = None,
                 feature_dim: int = 128, channels: Sequence[int] = (32, 64), hidden_dims: Sequence[int] = (256,)) -> None:
        super().__init__()
        if image_shape is not None and math.prod(image_shape) != data_dim:
            raise ValueError(f"image_shape {tuple(image_shape)} does not hold data_dim={data_dim} values")
        if num_classes < 2 or feature_dim < 1:
            raise ValueError(f"need num_classes >= 2 and feature_dim >= 1, got {num_classes}, {feature_dim}")
        self.config: dict[str, Any] = {
            "data_dim": int(data_dim), "num_classes": int(num_classes),
            "image_shape": None if image_shape is None else [int(s) for s in image_shape],
            "feature_dim": int(feature_dim), "channels": [int(c) for c in channels],
            "hidden_dims": [int(h) for h in hidden_dims],
        }
        self.num_classes, self.feature_dim = int(num_classes), int(feature_dim)
        if _uses_conv(image_shape, channels):
            # hidden_dims=(): conv stack -> one Linear to feature_dim, the penultimate layer.
            self.trunk: nn.Module = ConvEncoder(tuple(image_shape), feature_dim, channels, hidden_dims=())  # type: ignore[arg-type]
        else:
            self.trunk = MLP(data_dim, feature_dim, hidden_dims)
        self.head = nn.Linear(feature_dim, num_classes)
        self.register_buffer("test_accuracy", torch.tensor(float("nan")))

    def features(self, x: Tensor) -> Tensor:
        return torch.relu(self.trunk(x.flatten(1).to(self.head.weight.dtype)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def predict_logits(model: DomainClassifier, x: Tensor, batch_size: int = 1000) -> Tensor:
    """Logits in eval mode, batched so that 10k images never sit in one activation tensor."""
    model.eval()
    device = model.head.weight.device
    return torch.cat([model(chunk.to(device)) for chunk in x.split(batch_size)])


def _check_split(x: Tensor, y: Tensor, name: str) -> None:
    if x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"{name}: x must be flat float (batch, data_dim), got {tuple(x.shape)} {x.dtype}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{name}: y must be (batch,) = ({x.shape[0]},), got {tuple(y.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: x has NaN or inf values")


def train_classifier(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor,
                     image_shape: Sequence[int] | None = None, epochs: int = 2, seed: int = 0,
                     batch_size: int = 128, lr: float = 3e-3, num_classes: int | None = None,
                     device: str | torch.device = "cpu", **arch: Any) -> tuple[DomainClassifier, float]:
    """Adam with a one-cycle schedule (reaches ~99% on MNIST in 2 epochs); returns (frozen eval-mode model, test accuracy).

    Seeded through its own RNG streams (`fork_rng` for the init, a Generator for shuffling), so it
    neither depends on nor disturbs the caller's global seed.
    """
    _check_split(x_train, y_train, "train")
    _check_split(x_test, y_test, "test")
    if x_test.shape[1] != x_train.shape[1]:
        raise ValueError(f"train and test data_dim differ: {x_train.shape[1]} vs {x_test.shape[1]}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    y_train, y_test = y_train.long(), y_test.long()
    num_classes = num_classes or int(max(y_train.max(), y_test.max())) + 1
    with seeded_global_rng(seed):
        model = DomainClassifier(x_train.shape[1], num_classes, image_shape, **arch).to(device)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    model.train()
    with progress("classifier training", epochs * steps_per_epoch, "steps") as advance:
        for _ in range(epochs):
            for idx in torch.randperm(len(x_train), generator=gen).split(batch_size):
                loss = nn.functional.cross_entropy(model(x_train[idx].to(device)), y_train[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                advance()
    model.requires_grad_(False)
    preds = predict_logits(model, x_test).argmax(-1).cpu()
    acc = float(multiclass_accuracy(preds, y_test, num_classes=num_classes, average="micro"))
    model.test_accuracy.fill_(acc)
    return model, acc


_IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def load_idx_splits(directory: str | Path) -> Splits:
    """The four MNIST-layout IDX files of `directory` (MNIST, Fashion-MNIST) as flat float [0, 1] + int64 labels."""
    directory = Path(directory)
    missing = [f for f in _IDX_FILES if not (directory / f).is_file()]
    if missing:
        raise DataError(f"{directory} lacks {missing}; the classifier needs the four IDX files of an MNIST-layout dataset")
    arrays = [read_idx(directory / f) for f in _IDX_FILES]
    x_train, x_test = (torch.from_numpy(a.reshape(len(a), -1).astype(np.float32) / 255.0) for a in arrays[0::2])
    y_train, y_test = (torch.from_numpy(a.astype(np.int64)) for a in arrays[1::2])
    return x_train, y_train, x_test, y_test


def classifier_paths(cache_dir: str | Path, dataset_name: str) -> tuple[Path, Path]:
    """(<cache_dir>/<dataset>/classifier.pt, .../classifier.json)."""
    root = Path(cache_dir) / dataset_name
    return root / "classifier.pt", root / "classifier.json"


def _try_load(weights: Path, meta_path: Path, fingerprint: dict[str, Any], device: str | torch.device) -> DomainClassifier | None:
    """The cached model if its json fingerprint matches and the weights are the ones the json names; else None."""
    if not (weights.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        blob = weights.read_bytes()
        if meta.get("fingerprint") != fingerprint:
            log.info("classifier cache %s is for %s, not %s: retraining", meta_path, meta.get("fingerprint"), fingerprint)
            return None
        if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
            log.warning("classifier weights %s do not match the sha256 in %s: retraining", weights, meta_path)
            return None
        cfg = meta["arch"]
        model = DomainClassifier(cfg["data_dim"], cfg["num_classes"], cfg["image_shape"], cfg["feature_dim"],
                                 cfg["channels"], cfg["hidden_dims"])
        model.load_state_dict(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:  # corrupted json/weights, old layout
        log.warning("classifier cache %s is unreadable (%s): retraining", weights, exc)
        return None
    return model.requires_grad_(False).eval().to(device)


def load_or_train_classifier(dataset_name: str, cache_dir: str | Path, loader_fn: Callable[[], Splits],
                             image_shape: Sequence[int] | None = None, epochs: int = 2, seed: int = 0,
                             device: str | torch.device = "cpu", **train_kwargs: Any) -> tuple[DomainClassifier, float]:
    """The classifier cached under `<cache_dir>/<dataset_name>/`, trained (and cached) on a miss.

    The json beside the weights holds the test accuracy, the weights' sha256 and a fingerprint
    (dataset name, split sizes, data_dim, training settings); any mismatch or corruption retrains,
    so a stale or half-written cache is never used. Both files are written atomically, weights first.
    """
    x_train, y_train, x_test, y_test = loader_fn()
    fingerprint = {
        "version": CACHE_VERSION, "dataset": dataset_name, "n_train": len(x_train), "n_test": len(x_test),
        "data_dim": int(x_train.shape[1]), "image_shape": None if image_shape is None else [int(s) for s in image_shape],
        "epochs": int(epochs), "seed": int(seed),
        "train_kwargs": {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in sorted(train_kwargs.items())},
    }
    weights, meta_path = classifier_paths(cache_dir, dataset_name)
    model = _try_load(weights, meta_path, fingerprint, device)
    if model is not None:
        return model, float(model.test_accuracy)
    model, acc = train_classifier(x_train, y_train, x_test, y_test, image_shape, epochs, seed, device=device, **train_kwargs)
    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buf)
    blob = buf.getvalue()
    weights.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(weights) as fh:  # readers see the old file or the new one, never half of one
        fh.write(blob)
    meta = {"fingerprint": fingerprint, "test_accuracy": acc, "sha256": hashlib.sha256(blob).hexdigest(), "arch": model.config}
    with atomic_file(meta_path) as fh:
        fh.write(json.dumps(meta, indent=2).encode())
    log.info("trained %s classifier: test accuracy %.4f, cached at %s", dataset_name, acc, weights)
    return model, acc


__all__ = ["DomainClassifier", "train_classifier", "load_or_train_classifier", "load_idx_splits",
           "predict_logits", "classifier_paths"]
