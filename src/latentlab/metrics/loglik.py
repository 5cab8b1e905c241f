"""torchmetrics wrappers of the estimators' per-example results: means and standard errors over examples.

One sum-reduced Metric, `MeanAndSE` (float64 sum, sum of squares and count per quantity), so results reduce
across processes by summation and never keep per-example tensors. `LogLikelihood` reports `nll` +/- `nll_se`
and the convergence diagnostic `nll_half_gap` (nll at half the budget minus nll at the full budget).
The estimators themselves are in `latentlab.estimators`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from latentlab.errors import ConfigError, NumericalError


class MeanAndSE(Metric):
    """Mean and standard error over examples of each named per-example quantity; `compute` gives
    {name: mean, name_se: se} for every name that was updated (se is nan from a single example)."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.names = tuple(names)
        for name in self.names:
            for part in ("sum", "sumsq", "count"):
                self.add_state(f"{name}_{part}", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, **values: Tensor) -> None:  # type: ignore[override]
        unknown = sorted(set(values) - set(self.names))
        if unknown:
            raise ConfigError(f"{type(self).__name__} has no quantity {unknown[0]!r}; it has {list(self.names)}")
        for name, value in values.items():
            value = value.detach().reshape(-1).to(torch.float64)
            if not torch.isfinite(value).all():
                raise NumericalError(f"{type(self).__name__} got {(~torch.isfinite(value)).sum().item()} non-finite "
                                     f"{name} values")
            setattr(self, f"{name}_sum", getattr(self, f"{name}_sum") + value.sum())
            setattr(self, f"{name}_sumsq", getattr(self, f"{name}_sumsq") + value.pow(2).sum())
            setattr(self, f"{name}_count", getattr(self, f"{name}_count") + value.numel())

    def count_of(self, name: str) -> int:
        return int(getattr(self, f"{name}_count"))

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in self.names:
            n = getattr(self, f"{name}_count")
            if int(n) == 0:
                continue
            mean = getattr(self, f"{name}_sum") / n
            var = (getattr(self, f"{name}_sumsq") - n * mean.pow(2)).clamp(min=0.0) / (n - 1) if int(n) > 1 else None
            out[name] = float(mean)
            out[f"{name}_se"] = float((var / n).sqrt()) if var is not None else math.nan
        return out


class LogLikelihood(MeanAndSE):
    """Per-example log p(x) -> `nll` (= -mean, nats, lower is better), `nll_se`, and, when the estimates at half
    the budget are given, `nll_half_gap` = nll(half budget) - nll(full budget) (near 0 when converged)."""

    higher_is_better = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(("log_px", "half_gain"), **kwargs)

    @property
    def count(self) -> int:
        return self.count_of("log_px")

    def update(self, log_px: Tensor, log_px_half: Tensor | None = None) -> None:  # type: ignore[override]
        if log_px_half is None:
            super().update(log_px=log_px)
        else:
            super().update(log_px=log_px, half_gain=log_px - log_px_half)

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        stats = super().compute()
        out = {"nll": -stats["log_px"], "nll_se": stats["log_px_se"]}
        if "half_gain" in stats:
            out["nll_half_gap"] = stats["half_gain"]
        return out
