"""The settings of the evaluator: `NLLSettings` (conf/eval/nll/*.yaml) and `GapSettings` (eval.gap).

The budgets of `fast`, `standard` and `paper` live ONLY in conf/eval/nll/<name>.yaml; `NLLSettings.preset`
reads them, so code that runs without Hydra (a bare LightningModule, a notebook) gets the same numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from importlib.resources import files
from typing import Any, Mapping

import yaml

from latentlab.errors import ConfigError

ESTIMATORS = ("auto", "is", "ais")
AIS_STARTS = ("posterior", "prior")
_REQUIRED = {"name", "estimator", "k", "chunk_size", "ais_steps", "ais_chains", "ais_leapfrog"}


def _check_positive(owner: str, obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{owner}.{name} must be an integer >= 1, got {value!r}")


@dataclass
class NLLSettings:
    """How log p(x) is estimated (the protocol: importance sampling with q where the posterior has a density,
    else AIS from the Gaussian fitted to `fit_draws` of its draws).

    `estimator`: auto | is | ais. `k`, `chunk_size`: importance samples per example, drawn chunk_size at a
    time; `is_inflation` > 1: the proposal is the defensive mixture 1/2 q + 1/2 q with std x is_inflation.
    A posterior known only by draws (AVB, ALMOND) gets `sample_estimator` under `auto`: `is` from the
    `DrawMixture` of `fit_draws` draws (kernel bandwidth `kde_bandwidth` x their std, defensive half), `ais`, or
    `auto`: IS from draws up to `kde_max_dim` latent dimensions (a kernel proposal from 64 draws degrades fast with
    dimension), AIS above; `kde_refine` rounds of adaptive IS refine that mixture, each from k pilot draws. AIS: `ais_steps` intermediate distributions x `ais_chains` chains, `ais_leapfrog` HMC
    steps per transition, `ais_start` posterior (the fitted Gaussian) | prior. `max_batches`: at most this many
    batches per val/test epoch (None: all); `val_every_n_epochs`: 0 switches validation's NLL off.
    `name` is the budget's name (fast | standard | paper) that every result reports.
    """

    name: str
    estimator: str
    k: int
    chunk_size: int
    ais_steps: int
    ais_chains: int
    ais_leapfrog: int
    is_inflation: float = 1.0
    ais_start: str = "posterior"
    fit_draws: int = 64
    sample_estimator: str = "auto"
    kde_bandwidth: float = 0.2
    kde_max_dim: int = 2
    kde_refine: int = 0
    max_batches: int | None = None
    val_every_n_epochs: int = 1

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"eval.nll.estimator must be one of {'|'.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.sample_estimator not in ESTIMATORS:
            raise ConfigError(f"eval.nll.sample_estimator must be one of {'|'.join(ESTIMATORS)}, got {self.sample_estimator!r}")
        if not (isinstance(self.kde_bandwidth, (int, float)) and self.kde_bandwidth > 0):
            raise ConfigError(f"eval.nll.kde_bandwidth must be a number > 0, got {self.kde_bandwidth!r}")
        if self.ais_start not in AIS_STARTS:
            raise ConfigError(f"eval.nll.ais_start must be one of {'|'.join(AIS_STARTS)}, got {self.ais_start!r}")
        _check_positive("eval.nll", self, ("k", "chunk_size", "ais_steps", "ais_chains", "ais_leapfrog", "kde_max_dim"))
        if isinstance(self.kde_refine, bool) or not isinstance(self.kde_refine, int) or self.kde_refine < 0:
            raise ConfigError(f"eval.nll.kde_refine must be an integer >= 0, got {self.kde_refine!r}")
        if isinstance(self.fit_draws, bool) or not isinstance(self.fit_draws, int) or self.fit_draws < 2:
            raise ConfigError(f"eval.nll.fit_draws must be an integer >= 2, got {self.fit_draws!r}")
        if self.max_batches is not None and (not isinstance(self.max_batches, int) or self.max_batches < 1):
            raise ConfigError(f"eval.nll.max_batches must be null or an integer >= 1, got {self.max_batches!r}")
        if not isinstance(self.val_every_n_epochs, int) or self.val_every_n_epochs < 0:
            raise ConfigError(f"eval.nll.val_every_n_epochs must be an integer >= 0, got {self.val_every_n_epochs!r}")

    @classmethod
    def coerce(cls, spec: "NLLSettings | Mapping[str, Any] | str") -> "NLLSettings":
        """A settings object from itself, a preset name (fast | standard | paper) or a mapping of keys."""
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, str):
            return cls.preset(spec)
        data = {k: v for k, v in dict(spec).items() if k != "_target_"}
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"eval.nll.{unknown[0]} is not a setting of NLLSettings; allowed: {', '.join(sorted(allowed))}")
        missing = _REQUIRED - set(data)  # a partial mapping is a change to a preset (default: standard)
        base = cls.preset(str(data.get("name", "standard"))).as_dict() if missing else {}
        try:
            return cls(**{**base, **data})
        except TypeError as exc:
            raise ConfigError(f"eval.nll: {exc}; start from a preset, e.g. eval/nll=standard") from None

    @classmethod
    def preset(cls, name: str) -> "NLLSettings":
        """The packaged conf/eval/nll/<name>.yaml (fast | standard | paper) as settings."""
        source = files("latentlab.conf").joinpath("eval", "nll", f"{name}.yaml")
        if not source.is_file():
            raise ConfigError(f"unknown log p(x) budget {name!r}; choose eval/nll=fast|standard|paper")
        data = yaml.safe_load(source.read_text())
        data.pop("_target_", None)
        return cls(**data)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolve(self, has_density: bool, latent_dim: int) -> str:
        """`is` or `ais` for a posterior: `auto` picks IS where the posterior has a density, else `sample_estimator`,
        whose `auto` is IS from draws up to `kde_max_dim` latent dimensions and AIS above."""
        if self.estimator != "auto":
            return self.estimator
        if has_density:
            return "is"
        if self.sample_estimator != "auto":
            return self.sample_estimator
        return "is" if latent_dim <= self.kde_max_dim else "ais"

    def budget(self, estimator: str, from_draws: bool = False) -> str:
        """A short label of the budget that produced a number, e.g. `is k=1000 defensive x6` or `ais 500x4 L=5`."""
        defensive = f" defensive x{self.is_inflation:g}" if self.is_inflation != 1.0 else ""
        if estimator == "is" and from_draws:
            refined = f", {self.kde_refine} adaptive rounds of k" if self.kde_refine else ""
            return f"is k={self.k} from {self.fit_draws} draws (kde h={self.kde_bandwidth:g}{defensive}, prior 1/3{refined})"
        if estimator == "is":
            return f"is k={self.k}{defensive}"
        return f"ais {self.ais_steps}x{self.ais_chains} L={self.ais_leapfrog} from {self.ais_start}"


@dataclass
class GapSettings:
    """The inference-gap analysis (eval.gap). `elbo_k`: draws for each method's own bound; `max_elements`
    bounds elbo_k x examples x data_dim per bound call. The best local Gaussian q* (Cremer et al. optimise to
    convergence): Adam at `local_lr` on `local_k` fixed draws per example (common random numbers make the
    objective deterministic, so "converged" is checkable), stopped per example once the objective gains
    less than `local_tol` nats over `local_check_every` steps, at most `local_steps` steps; examples still
    moving then are reported as not converged. Its ELBO is re-estimated from `local_eval_k` fresh draws."""

    elbo_k: int = 1000
    local_steps: int = 5000
    local_lr: float = 0.05
    local_k: int = 128
    local_eval_k: int = 1000
    local_tol: float = 1e-3
    local_check_every: int = 100
    max_elements: int = 2**24

    def __post_init__(self) -> None:
        _check_positive("eval.gap", self, ("elbo_k", "local_k", "local_eval_k", "local_check_every", "max_elements"))
        if int(self.local_steps) < 0 or not self.local_lr > 0 or not self.local_tol > 0:
            raise ConfigError(f"eval.gap needs local_steps >= 0, local_lr > 0 and local_tol > 0, got "
                              f"{self.local_steps}, {self.local_lr}, {self.local_tol}")
