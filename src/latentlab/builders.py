"""Config -> objects, shared by `latentlab-train`, `latentlab-eval`, tests and notebooks.

The data module is built first because the model's input size and image shape come from it
(the same link LightningCLI makes with `link_arguments`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from latentlab.errors import ConfigError, LatentlabError
from latentlab.files import atomic_file

if TYPE_CHECKING:
    import lightning.pytorch as L

    from latentlab.models.base import LatentVariableModel


def instantiate_section(key: str, node: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, with the error a user can act on: Hydra wraps whatever a constructor
    raises in an InstantiationException ("Error in call to target ..."); unwrap our own `ConfigError`/
    `DataError`, and turn anything else (a TypeError, a ValueError) into a ConfigError naming `key`."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause: BaseException = exc
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, LatentlabError):
            raise cause from None
        target = node.get("_target_") if hasattr(node, "get") else None
        detail = f"{type(cause).__name__}: {cause}" if cause is not exc else str(exc).strip().splitlines()[0]
        raise ConfigError(f"{key}: cannot build {target or 'it'} from the config: {detail}") from None


def compose_config(overrides: list[str] | None = None, output_dir: str | Path | None = None,
                   config_name: str = "train") -> DictConfig:
    """The config `latentlab-train` (or `-eval`) would run with these overrides, for tests and notebooks;
    `output_dir` stands in for the run directory Hydra would create."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="latentlab.conf", version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides or []))
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def resolve_paths(cfg: DictConfig) -> None:
    """Make `paths.data_dir` absolute against the directory the user ran from (Hydra keeps the cwd)."""
    if "paths" in cfg and cfg.paths.get("data_dir") is not None:
        with open_dict(cfg):
            cfg.paths.data_dir = str(Path(os.path.expanduser(str(cfg.paths.data_dir))).resolve())


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    if cfg.get("data") is None or "_target_" not in cfg.data:
        raise ConfigError("no dataset selected: pass data=digits|mnist|fashion_mnist|binarized_mnist|...")
    # _convert_="all": plain dicts/lists reach the constructors, so saved hyperparameters stay weights_only-loadable
    return instantiate_section("data", cfg.data, _convert_="all")


def build_model(cfg: DictConfig, datamodule: L.LightningDataModule) -> LatentVariableModel:
    if cfg.get("model") is None or "_target_" not in cfg.model:
        raise ConfigError("no model selected: pass model=vae|avb|avb_ac|almond")
    model = instantiate_section("model", cfg.model, data_dim=datamodule.data_dim,
                                image_shape=getattr(datamodule, "image_shape", None), _recursive_=True, _convert_="all")
    model.run_config = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    from latentlab.models.base import LatentVariableModel  # deferred: builders is imported before the models load

    if isinstance(model, LatentVariableModel):  # conf/eval/nll/: the log p(x) budgets of validation and test
        evaluation = cfg.get("eval") or {}
        model.configure_evaluation(val=evaluation.get("val_nll"), test=evaluation.get("nll"), seed=cfg.get("seed"))
    return model


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    return [instantiate_section(f"callbacks.{name}", c) for name, c in (cfg.get("callbacks") or {}).items()
            if c is not None and "_target_" in c]


def build_loggers(cfg: DictConfig) -> list[Any]:
    return [instantiate_section(f"logger.{name}", c) for name, c in (cfg.get("logger") or {}).items()
            if c is not None and "_target_" in c]


def build_trainer(cfg: DictConfig, callbacks: list[Any], loggers: list[Any]) -> L.Trainer:
    """Lightning's Trainer from `cfg.trainer`, and torch's switches beside it (NaN fill, subnormals flushed).

    `trainer.deterministic` turns on torch's deterministic algorithms, and with them, unless told otherwise, a NaN
    fill of every new tensor before an op writes it (`torch.utils.deterministic.fill_uninitialized_memory`): one more
    memory pass over every activation and gradient, ~4% of the MNIST VAE's step on two CPU threads, that changes
    nothing an op computes (a correct op overwrites what it allocates). Off unless the config says true; set here
    and, through `TorchSwitches`, in every process `ddp_spawn` starts. `flush_denormal` (default true) has every CPU
    thread read and write subnormal floats as zero while the Trainer runs (`TorchSwitches` says why). Without a
    progress bar among `callbacks` (`callbacks.progress_bar=null`) it turns off the bar Lightning would add instead,
    unless `trainer.enable_progress_bar` says otherwise.
    """
    import torch
    from lightning.pytorch.callbacks import ProgressBar

    from latentlab.callbacks.torch_switches import TorchSwitches

    switches = TorchSwitches.from_config(cfg)
    extra = {}
    if "enable_progress_bar" not in cfg.trainer and not any(isinstance(cb, ProgressBar) for cb in callbacks):
        extra["enable_progress_bar"] = False  # `callbacks.progress_bar=null` means no bar, not Lightning's own
    trainer = instantiate_section("trainer", cfg.trainer, callbacks=[*callbacks, switches], logger=loggers or False,
                                  **extra)
    torch.utils.deterministic.fill_uninitialized_memory = switches.fill
    return trainer


def write_json_atomic(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Write then rename, so a reader never sees half a metrics file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as fh:
        json.dump(dict(payload), fh, indent=2, sort_keys=True)
        fh.write("\n")


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Lightning's callback_metrics -> flat {key: float} for metrics.json."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out
