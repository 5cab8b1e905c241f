"""`latentlab-cli`: Lightning's own command line (`LightningCLI`) over latentlab's models and data modules.

For users who drive Lightning through its CLI rather than Hydra. The same LightningModules and
DataModules, built from their plain typed constructor arguments:

    latentlab-cli fit --model VAE --data DigitsDataModule --trainer.max_epochs 5
    latentlab-cli fit --model ALMOND --model.n_chains 20 --data MNISTDataModule --data.data_dir ../shared/data
    latentlab-cli fit --config run.yaml                      # a file as --print_config writes it
    latentlab-cli fit --model AVB --data DigitsDataModule --print_config > run.yaml
    latentlab-cli test --config run.yaml --ckpt_path <run>/checkpoints/last.ckpt
    latentlab-cli validate --config run.yaml --ckpt_path ...

The model's `data_dim` and `image_shape` come from the data module (`link_arguments(...,
apply_on="instantiate")`), as `latentlab-train` passes them. Optimisers are the models' own `optimizer`
arguments (a callable from parameters to an optimiser: `--model.optimizer torch.optim.Adam
--model.optimizer.lr 3e-4`), not Lightning's `--optimizer`, because AVB and ALMOND use two optimisers each.

Trainer defaults differ from Lightning's where latentlab needs it: `inference_mode=False` (AIS and
Langevin need gradients w.r.t. z in validation/test). Checkpoints carry the run config in the same layout
as `latentlab-train`'s, so `latentlab-eval ckpt_path=...` evaluates them too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from latentlab.callbacks.dashboard import MethodProgressBar
from latentlab.callbacks.torch_switches import TorchSwitches
from latentlab.config_schema import check_model_against_trainer, trainer_value_error
from latentlab.data import LatentDataModule
from latentlab.entry import report
from latentlab.errors import ConfigError, LatentlabError
from latentlab.models import LatentVariableModel

__all__ = ["LatentlabCLI", "build_cli", "hydra_layout", "main"]

#: `Trainer` defaults of `latentlab-cli`, the same as conf/trainer/default.yaml where it matters.
TRAINER_DEFAULTS: dict[str, Any] = {"inference_mode": False, "max_epochs": 30}


def _to_hydra(node: Any) -> Any:
    """jsonargparse's `{class_path, init_args}` -> Hydra's `{_target_, ...}`, recursively."""
    if isinstance(node, Mapping):
        if "class_path" in node:
            return {"_target_": node["class_path"], **{k: _to_hydra(v) for k, v in (node.get("init_args") or {}).items()}}
        return {k: _to_hydra(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_to_hydra(v) for v in node]
    return node


def hydra_layout(config: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a `latentlab-cli` config that `latentlab-eval` reads, in `latentlab-train`'s layout:
    `model` and `data` as `_target_` nodes (the model without `data_dim`/`image_shape`, which come from
    the data module), optimisers as `_partial_` targets, `seed`, `paths.data_dir`."""
    model = _to_hydra(config["model"])
    for key in ("data_dim", "image_shape"):
        model.pop(key, None)
    for key, value in list(model.items()):
        if isinstance(value, dict) and "_target_" in value and ("optimizer" in key or key == "scheduler"):
            value["_partial_"] = True
    data = _to_hydra(config["data"])
    return {"model": model, "data": data, "seed": config.get("seed_everything"),
            "paths": {"data_dir": data.get("data_dir")}, "trainer": {}}


class LatentlabCLI(LightningCLI):
    """LightningCLI with the data module's sizes linked into the model and the run config saved in checkpoints."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.data_dim", "model.init_args.data_dim", apply_on="instantiate")
        parser.link_arguments("data.image_shape", "model.init_args.image_shape", apply_on="instantiate")
        parser.add_argument("--fill_uninitialized_memory", type=bool, default=False,
                            help="under --trainer.deterministic, have torch fill each new tensor with NaN before an op "
                                 "writes it (torch's default; off as in latentlab-train: a memory pass over every "
                                 "activation and gradient, ~4%% of a step, that changes no value)")
        parser.add_argument("--flush_denormal", type=bool, default=True,
                            help="read and write subnormal floats as zero in every CPU thread while the Trainer runs "
                                 "(as latentlab-train: on an Intel CPU each operation on one takes a microcode assist)")

    def _config(self) -> dict[str, Any]:
        return (self.config[self.subcommand] if self.subcommand else self.config).as_dict()

    def before_instantiate_classes(self) -> None:
        """A precision that casts the weights (bf16-true|16-true|64-true: the samplers, estimators and callbacks feed
        float32 tensors) is refused before anything is built, as latentlab-train refuses it."""
        precision = (self._config().get("trainer") or {}).get("precision")
        if precision is not None and (err := trainer_value_error("precision", precision)):
            raise ConfigError(err)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        config = self._config()
        if self.subcommand in (None, "fit"):  # what only the built model can tell, for training
            check_model_against_trainer({"trainer": config.get("trainer") or {}}, self.model)
        self.model.run_config = hydra_layout(config)
        switches = TorchSwitches.from_config(config)
        torch.utils.deterministic.fill_uninitialized_memory = switches.fill
        self.trainer.callbacks.append(switches)  # and in the processes ddp_spawn starts
        self._method_progress_bar()

    def _method_progress_bar(self) -> None:
        """Where the config names no progress bar, Lightning added its own Rich bar, which redraws up to 100 times a
        second (11-13% of a fast model's time in a terminal): latentlab-train's `MethodProgressBar` replaces it."""
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        given = init.get("trainer", {}).get("callbacks") or []
        named = any(isinstance(cb, ProgressBar) for cb in (given if isinstance(given, list) else [given]))
        bars = [i for i, cb in enumerate(self.trainer.callbacks) if isinstance(cb, ProgressBar)]
        if bars and not named:
            self.trainer.callbacks[bars[0]] = MethodProgressBar()


def build_cli(args: list[str] | dict[str, Any] | None = None, run: bool = True) -> LatentlabCLI:
    """The CLI over every latentlab model and data module (`--model VAE|AVB|ALMOND`, `--data DigitsDataModule|...`);
    `args` instead of sys.argv, `run=False` to only build the objects (no subcommand)."""
    return LatentlabCLI(LatentVariableModel, LatentDataModule, subclass_mode_model=True, subclass_mode_data=True,
                        trainer_defaults=TRAINER_DEFAULTS, save_config_kwargs={"overwrite": True},
                        auto_configure_optimizers=False, args=args, run=run)


def main() -> None:
    """Entry point of the `latentlab-cli` console script (returns nothing: a console script exits with it); a refused
    configuration is one line on stderr and exit status 2, as with latentlab-train."""
    try:
        build_cli()
    except LatentlabError as exc:
        report(exc)
