"""Sample-quality metrics in a domain classifier's feature space: FID, KID, Inception Score,
improved precision/recall (Kynkäänniemi et al. 2019), and `SampleQuality`, all of them at once.

FID/KID/IS are torchmetrics' own implementations with the classifier plugged in as the feature
network (torchmetrics passes inputs to a custom feature module untouched, so flat float [0, 1]
data goes straight in; `normalize` must stay False, else IS would cast the input to uint8).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics import Metric
# Submodule imports: torchmetrics.image only re-exports these when torch-fidelity (the Inception
# backbone, not needed with a custom feature network) is installed.
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.utilities import dim_zero_cat

from latentlab.metrics.classifier import DomainClassifier
from latentlab.rng import seeded_global_rng


class ClassifierFeatures(nn.Module):
    """torchmetrics feature extractor: flat x -> the classifier's penultimate `features` or its `logits`.

    Frozen like torchmetrics' NoTrainInceptionV3: `.train()` cannot switch it out of eval mode, and
    no gradient flows. `num_features` spares torchmetrics the probe with a dummy 299x299 image.
    """

    def __init__(self, classifier: DomainClassifier, output: Literal["features", "logits"] = "features") -> None:
        super().__init__()
        if output not in ("features", "logits"):
            raise ValueError(f"output must be 'features' or 'logits', got {output!r}")
        self.classifier = classifier.eval()
        self.output = output
        self.num_features = classifier.feature_dim if output == "features" else classifier.num_classes

    def train(self, mode: bool = True) -> "ClassifierFeatures":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        return self.classifier.features(x) if self.output == "features" else self.classifier(x)


class Precomputed(nn.Identity):
    """Feature 'extractor' for inputs that already are features (lets `SampleQuality` run the classifier once)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features


def _as_feature(feature: nn.Module, output: Literal["features", "logits"]) -> nn.Module:
    return ClassifierFeatures(feature, output) if isinstance(feature, DomainClassifier) else feature


class _Seeded:
    """Mixin: KID and IS draw random subsets/splits from the global RNG; fork it so compute is reproducible."""

    seed: int

    def compute(self) -> Any:
        with seeded_global_rng(self.seed):
            return super().compute()  # type: ignore[misc]


class ClassifierFID(FrechetInceptionDistance):
    """FID: ||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^1/2) of the features. update(x, real: bool)."""

    def __init__(self, feature: DomainClassifier | nn.Module, **kwargs: Any) -> None:
        super().__init__(feature=_as_feature(feature, "features"), normalize=False, **kwargs)


class ClassifierKID(_Seeded, KernelInceptionDistance):
    """KID: unbiased MMD^2 with the cubic polynomial kernel, mean and std over random subsets. update(x, real: bool)."""

    def __init__(self, feature: DomainClassifier | nn.Module, subsets: int = 100, subset_size: int = 1000,
                 seed: int = 0, **kwargs: Any) -> None:
        with warnings.catch_warnings():  # "will save all extracted features": that is the point of it
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(feature=_as_feature(feature, "features"), subsets=subsets, subset_size=subset_size,
                             normalize=False, **kwargs)
        self.seed = seed

    def compute(self) -> tuple[Tensor, Tensor]:
        """Like torchmetrics' KID, but subsets shrink to the smaller sample instead of raising."""
        n = min(sum(len(f) for f in self.real_features), sum(len(f) for f in self.fake_features))
        configured, self.subset_size = self.subset_size, min(self.subset_size, n)
        try:
            return super().compute()
        finally:
            self.subset_size = configured


class ClassifierIS(_Seeded, InceptionScore):
    """Inception Score exp(E_x KL(p(y|x) || p(y))) with the classifier's softmax; mean and std over `splits`. update(x)."""

    def __init__(self, feature: DomainClassifier | nn.Module, splits: int = 10, seed: int = 0, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(feature=_as_feature(feature, "logits"), splits=splits, normalize=False, **kwargs)
        self.seed = seed


def knn_radii(features: Tensor, k: int = 3, chunk_size: int = 1024) -> Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    if len(features) <= k:
        raise ValueError(f"need more than k={k} points to estimate a k-NN manifold, got {len(features)}")
    # k + 1 smallest distances include the point itself (distance 0) at the front.
    return torch.cat([torch.cdist(chunk, features).topk(k + 1, dim=1, largest=False).values[:, k]
                      for chunk in features.split(chunk_size)])


def manifold_coverage(query: Tensor, support: Tensor, radii: Tensor, chunk_size: int = 1024) -> Tensor:
    """Fraction of `query` points inside the union of balls B(support_i, radii_i); memory chunk_size x len(support)."""
    inside = [(torch.cdist(chunk, support) <= radii).any(dim=1) for chunk in query.split(chunk_size)]
    return torch.cat(inside).double().mean()


class PrecisionRecall(Metric):
    """Improved precision and recall (Kynkäänniemi et al. 2019) in a feature space.

    Each set's manifold is the union of balls around its features with radius = distance to the
    k-th nearest neighbour in that set. precision = fraction of generated features inside the real
    manifold (are samples realistic?); recall = fraction of real features inside the generated
    manifold (is the data covered?). update(x, real: bool); compute() -> {"precision", "recall"}.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, feature: DomainClassifier | nn.Module | None = None, k: int = 3, chunk_size: int = 1024,
                 reset_real_features: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if k < 1 or chunk_size < 1:
            raise ValueError(f"k and chunk_size must be >= 1, got {k}, {chunk_size}")
        self.feature = None if feature is None else _as_feature(feature, "features")
        self.k, self.chunk_size, self.reset_real_features = k, chunk_size, reset_real_features
        self.add_state("real_features", [], dist_reduce_fx="cat")
        self.add_state("fake_features", [], dist_reduce_fx="cat")

    def reset(self) -> None:
        """Like torchmetrics' FID/KID: with reset_real_features=False the real set survives, so one real
        set can be scored against many generators without recomputing its features."""
        real = list(self.real_features)  # Metric.reset clears list states in place
        super().reset()
        if not self.reset_real_features:
            self.real_features = real

    def update(self, x: Tensor, real: bool) -> None:
        feats = x if self.feature is None else self.feature(x)
        (self.real_features if real else self.fake_features).append(feats.detach().flatten(1))

    def compute(self) -> dict[str, Tensor]:
        # float64: radii and distances are compared with <=, and cdist's matmul path loses digits in float32.
        real = dim_zero_cat(self.real_features).double()
        fake = dim_zero_cat(self.fake_features).double()
        precision = manifold_coverage(fake, real, knn_radii(real, self.k, self.chunk_size), self.chunk_size)
        recall = manifold_coverage(real, fake, knn_radii(fake, self.k, self.chunk_size), self.chunk_size)
        return {"precision": precision, "recall": recall}


class SampleQuality(nn.Module):
    """All sample-quality metrics of generated vs real data, one classifier pass per batch.

    update(x, real) feeds flat batches; compute() -> {fid, kid_mean, kid_std, is_mean, is_std,
    precision, recall, classifier_acc} as floats. IS is of the generated samples; `classifier_acc` is the
    feature network's own test accuracy, reported because FID with a bad network is meaningless.
    reset_real_features=False keeps the real set across reset(): score many generators against one real set.
    """

    def __init__(self, classifier: DomainClassifier, kid_subsets: int = 100, kid_subset_size: int = 1000,
                 is_splits: int = 10, k: int = 3, seed: int = 0, reset_real_features: bool = True) -> None:
        super().__init__()
        self.classifier = ClassifierFeatures(classifier)
        feats, keep = Precomputed(classifier.feature_dim), {"reset_real_features": reset_real_features}
        self.fid = ClassifierFID(feats, **keep)
        self.kid = ClassifierKID(feats, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed, **keep)
        self.inception = ClassifierIS(Precomputed(classifier.num_classes), splits=is_splits, seed=seed)
        self.pr = PrecisionRecall(k=k, **keep)

    @torch.no_grad()
    def update(self, x: Tensor, real: bool) -> None:
        clf = self.classifier.classifier
        feats = clf.features(x.flatten(1))
        for metric in (self.fid, self.kid, self.pr):
            metric.update(feats, real=real)
        if not real:
            self.inception.update(clf.head(feats))

    def compute(self) -> dict[str, float]:
        kid_mean, kid_std = self.kid.compute()
        is_mean, is_std = self.inception.compute()
        pr = self.pr.compute()
        return {"fid": float(self.fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
                "is_mean": float(is_mean), "is_std": float(is_std), "precision": float(pr["precision"]),
                "recall": float(pr["recall"]), "classifier_acc": float(self.classifier.classifier.test_accuracy)}

    def reset(self) -> None:
        for metric in (self.fid, self.kid, self.inception, self.pr):
            metric.reset()


def sample_quality(real: Tensor, fake: Tensor, classifier: DomainClassifier, batch_size: int = 1000,
                   **kwargs: Any) -> dict[str, float]:
    """One-shot `SampleQuality` of two flat sample sets (kwargs go to SampleQuality)."""
    device = classifier.head.weight.device
    metric = SampleQuality(classifier, **kwargs).to(device)
    for data, is_real in ((real, True), (fake, False)):
        for chunk in data.split(batch_size):
            metric.update(chunk.to(device), real=is_real)
    return metric.compute()


__all__ = ["ClassifierFeatures", "Precomputed", "ClassifierFID", "ClassifierKID", "ClassifierIS", "PrecisionRecall",
           "SampleQuality", "sample_quality", "knn_radii", "manifold_coverage"]
