"""Validate every value of a composed config before anything is built, with messages that name the
key and what is allowed.

The schema is not written twice: each `_target_` section (data, model, trainer, callbacks, loggers,
optimisers, schedulers) is checked against the signature of the class or function it instantiates
(its parameter names and type hints: `int`, `float`, `Literal[...]`, `Optional`, unions, sequences,
the spec dataclasses `NetSpec`/`LikelihoodSpec`/`EvalSpec`), so a typo'd key, a string where a number
belongs, or a value outside a `Literal` is caught with the allowed keys/values listed. Ranges that a
type cannot express are checked by the constructors themselves (`ConfigError` naming `model.<key>`,
`data.<key>`) and, for the Lightning Trainer, which reports them late and unclearly, here
(`TRAINER_RANGES`). Command-line overrides are parsed with Hydra's own grammar first
(`check_overrides`), so a malformed one is reported as such rather than as a stack trace.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections import abc
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from latentlab.errors import ConfigError

#: Top-level keys of `conf/train.yaml` and what each may hold.
TOP_LEVEL: dict[str, Any] = {
    "task_name": str,
    "tags": list[str] | None,
    "seed": int | None,
    "ckpt_path": str | None,
    "ckpt_weights_only": bool,
    "train": bool,
    "test": bool,
    "optimized_metric": str | None,
    "fill_uninitialized_memory": bool,
    "flush_denormal": bool,
}
SECTIONS = ("data", "net", "model", "sampler", "trainer", "callbacks", "logger", "paths", "eval", "hydra", "experiment",
            "hparams_search")
EVAL_TOP_LEVEL: dict[str, Any] = {  # conf/eval.yaml (latentlab-eval)
    "task_name": str,
    "tags": list[str] | None,
    "seed": int | None,
    "ckpt_path": str | None,
    "train_classifier": str | None,
    "data_overrides": dict[str, Any] | None,
    "fill_uninitialized_memory": bool,
    "flush_denormal": bool,
}
EVAL_SECTIONS = ("eval", "trainer", "logger", "callbacks", "paths", "hydra")  # callbacks: logger=wandb|tensorboard's
SEED_MAX = 2**32 - 1  # numpy's seed range, which seed_everything enforces


def _int_at_least(low: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v is None or (_is_int(v) and v >= low) else f"an integer >= {low}"
    return check


def _batches(v: Any) -> str | None:
    """Lightning's limit_*_batches: a count (int >= 0) or a fraction (float in [0, 1])."""
    if v is None or (_is_int(v) and v >= 0) or (isinstance(v, float) and 0.0 <= v <= 1.0):
        return None
    return "an integer count >= 0 or a fraction in [0.0, 1.0]"


def _interval(v: Any) -> str | None:
    if v is None or (_is_int(v) and v >= 1) or (isinstance(v, float) and 0.0 < v <= 1.0):
        return None
    return "an integer number of batches >= 1 or a fraction of an epoch in (0.0, 1.0]"


def _non_negative(v: Any) -> str | None:
    return None if v is None or (_is_number(v) and v >= 0) else "a number >= 0 or null"


def _devices(v: Any) -> str | None:
    if v == "auto" or (_is_int(v) and (v == -1 or v >= 1)) or (isinstance(v, str) and v.replace(",", "").replace("-", "").isdigit()):
        return None
    if isinstance(v, (list, ListConfig)) and all(_is_int(d) and d >= 0 for d in v):
        return None
    return "a number of devices (int >= 1, -1 for all), a list of device ids, or 'auto'"


ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")
#: Precisions whose weights are float32: samplers, estimators and callbacks feed float32 tensors to the networks, so
#: `bf16-true`/`16-true`/`64-true` (weights cast themselves) fail mid-run with a dtype mismatch.
PRECISIONS = {"32-true": "32", "bf16-mixed": "bf16", "16-mixed": "16"}  # Lightning's name -> its short alias


def _precision(v: Any) -> str | None:
    if str(v) in PRECISIONS or str(v) in PRECISIONS.values():
        return None
    return (f"one of {'|'.join(PRECISIONS)} (float32 weights: the samplers, estimators and callbacks feed float32 "
            "tensors; bf16-mixed gives the bfloat16 speed-up)")

#: Trainer values Lightning would reject late (or not at all), with what is allowed.
TRAINER_RANGES: dict[str, Callable[[Any], str | None]] = {
    "max_epochs": _int_at_least(-1),
    "min_epochs": _int_at_least(0),
    "max_steps": _int_at_least(-1),
    "min_steps": _int_at_least(0),
    "check_val_every_n_epoch": _int_at_least(1),
    "log_every_n_steps": _int_at_least(1),
    "num_sanity_val_steps": _int_at_least(-1),
    "accumulate_grad_batches": _int_at_least(1),
    "limit_train_batches": _batches,
    "limit_val_batches": _batches,
    "limit_test_batches": _batches,
    "limit_predict_batches": _batches,
    "val_check_interval": _interval,
    "gradient_clip_val": _non_negative,
    "devices": _devices,
    "precision": _precision,
    "accelerator": lambda v: None if v in ACCELERATORS or isinstance(v, Mapping) else f"one of {'|'.join(ACCELERATORS)}",
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ----- command line -------------------------------------------------------------------------------
def check_overrides(overrides: Sequence[str]) -> None:
    """Parse command-line overrides with Hydra's grammar; a malformed one becomes a `ConfigError`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for text in overrides:
        try:
            parser.parse_overrides([text])
        except OverrideParseException as exc:
            detail = str(exc).strip().splitlines()[0]
            key, _, value = text.partition("=")
            quoted = (f" (here: \"{key}='{value}'\": checkpoint names such as epoch=3-step=300.ckpt hold '=')"
                      if "=" in value else "")
            raise ConfigError(f"malformed command-line override {text!r}: {detail}. Overrides look like key=value "
                              "(e.g. trainer.max_epochs=5), +key=value to add a key, ~key to delete one; quote values "
                              f"with spaces or special characters{quoted}") from None


# ----- type checks --------------------------------------------------------------------------------
def _describe(annotation: Any) -> str:
    """A short human name for a type hint ('int', 'one of a|b', 'list of int or null')."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None) or annotation is None:
        return "null"
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if annotation in simple:
        return simple[annotation]
    if origin is typing.Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in args))
    kind = origin or annotation
    if kind in (list, tuple, abc.Sequence, abc.Iterable, abc.Collection):
        return f"a list of {_describe(args[0])}" if args else "a list"
    if dataclasses.is_dataclass(annotation):
        return f"a mapping of {annotation.__name__} fields"
    if kind in (dict, abc.Mapping):
        return "a mapping"
    if kind is abc.Callable:
        return "a {_target_: ...} mapping"
    return getattr(annotation, "__name__", str(annotation))


def _type_error(key: str, value: Any, annotation: Any) -> str | None:
    """Why `value` does not fit `annotation` (None when it fits or the hint is beyond what config can say)."""
    if annotation is Any or annotation is inspect.Parameter.empty or isinstance(annotation, (str, typing.TypeVar)):
        return None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        specs = [a for a in args if dataclasses.is_dataclass(a)]
        if specs and isinstance(value, Mapping):  # `Spec | Mapping[str, Any]`: the mapping must fit the spec
            return _type_error(key, value, specs[0])
        errors = [_type_error(key, value, a) for a in args]
        if any(e is None for e in errors):
            return None
        # a mapping that fails the one option taking mappings (a spec dataclass, a _target_): say why
        generic = f"{key} must be "
        specific = [e for e in errors if e and not e.startswith(generic)]
        return specific[0] if specific else f"{key} must be {_describe(annotation)}, got {value!r}"
    if origin is typing.Literal:
        return None if any(value == a and type(value) is type(a) for a in args) else \
            f"{key} must be one of {'|'.join(str(a) for a in args)}, got {value!r}"
    if annotation is type(None) or annotation is None:
        return None if value is None else f"{key} must be null, got {value!r}"
    if value is None:
        return f"{key} must be {_describe(annotation)}, got null"
    if annotation is bool:
        return None if isinstance(value, bool) else f"{key} must be true or false, got {value!r}"
    if annotation is int:
        return None if _is_int(value) else f"{key} must be an integer, got {value!r}"
    if annotation is float:
        return None if _is_number(value) else f"{key} must be a number, got {value!r}"
    if annotation is str:
        return None if isinstance(value, str) else f"{key} must be a string, got {value!r}"
    if annotation is Path or (isinstance(annotation, type) and issubclass(annotation, Path)):
        return None if isinstance(value, str) else f"{key} must be a path string, got {value!r}"
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if not isinstance(value, Mapping):
            return f"{key} must be a mapping of {annotation.__name__} fields, got {value!r}"
        return _dataclass_error(key, value, annotation)
    seq_origin = origin or annotation
    if seq_origin in (list, tuple, abc.Sequence, abc.Iterable, abc.Collection):
        if not isinstance(value, (list, tuple)):
            return f"{key} must be {_describe(annotation)}, got {value!r}"
        if seq_origin is tuple and args and args[-1] is not Ellipsis:  # fixed-length tuple, e.g. Adam's betas
            if len(value) != len(args):
                return f"{key} must have {len(args)} entries, got {value!r}"
            return next((e for i, (v, a) in enumerate(zip(value, args)) if (e := _type_error(f"{key}[{i}]", v, a))), None)
        item = args[0] if args else None
        if item is not None:
            return next((e for i, v in enumerate(value) if (e := _type_error(f"{key}[{i}]", v, item))), None)
        return None
    if seq_origin in (dict, abc.Mapping):
        return None if isinstance(value, Mapping) else f"{key} must be a mapping, got {value!r}"
    if seq_origin is abc.Callable:
        if isinstance(value, Mapping) and "_target_" in value:
            return _target_error(key, value)
        return f"{key} must be a {{_target_: ..., _partial_: true}} mapping (e.g. torch.optim.Adam), got {value!r}"
    if isinstance(value, Mapping) and "_target_" in value:  # any class, given as a config to instantiate
        return _target_error(key, value)
    if isinstance(annotation, type) and isinstance(value, (str, int, float, bool, list, tuple)):
        return f"{key} must be {_describe(annotation)}, got {value!r}"  # e.g. a string where a Tensor is needed
    return None  # a class instance a config can only give as a _target_ mapping, checked above


def _dataclass_error(key: str, value: Mapping[str, Any], cls: type) -> str | None:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for name, v in value.items():
        if name not in fields:
            return f"{key}.{name} is not a setting of {cls.__name__}; allowed: {', '.join(sorted(fields))}"
        if err := _type_error(f"{key}.{name}", v, hints.get(name, Any)):
            return err
    return None


def _locate(key: str, target: Any) -> Any:
    from hydra.utils import get_object

    if not isinstance(target, str):
        raise ConfigError(f"{key}._target_ must be a dotted import path, got {target!r}")
    try:
        return get_object(target)
    except Exception as exc:  # noqa: BLE001 - ImportError, AttributeError, whatever the import raises
        cause = exc.__cause__ or exc
        raise ConfigError(f"{key}._target_={target!r} cannot be imported ({type(cause).__name__}: {cause}); "
                          "check the spelling of the class path") from None


def _signature(obj: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """(parameters, resolved type hints, accepts **kwargs) of a class's __init__ or a function."""
    fn = obj.__init__ if isinstance(obj, type) else obj
    try:
        params = dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}, {}, True
    params.pop("self", None)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable forward references: check names, not types
        hints = {}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return params, hints, var_kw


def _target_error(key: str, section: Mapping[str, Any]) -> str | None:
    """Keys and types of a `_target_` section against the signature of what it instantiates."""
    target = _locate(key, section.get("_target_"))
    params, hints, var_kw = _signature(target)
    allowed = [n for n, p in params.items() if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    for name, value in section.items():
        if name.startswith("_") and name.endswith("_"):  # _target_, _partial_, _convert_, _recursive_, _args_
            continue
        if name not in params:
            if var_kw:
                continue
            return (f"{key}.{name} is not a parameter of {section['_target_']}; allowed: {', '.join(allowed)}")
        if err := _type_error(f"{key}.{name}", value, hints.get(name, Any)):
            return err
    return None


# ----- the whole config ---------------------------------------------------------------------------
def _resolved(cfg: DictConfig, key: str) -> Any:
    """A section as plain containers with interpolations resolved; errors name the key."""
    try:
        node = OmegaConf.select(cfg, key, throw_on_missing=True)
        return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node
    except OmegaConfBaseException as exc:
        msg = str(exc).strip().splitlines()[0]
        if "Missing mandatory value" in msg:
            raise ConfigError(f"{key} has no value (???): set it, e.g. {key}=...") from None
        raise ConfigError(f"{key}: cannot resolve the config value: {msg}") from None


def _validate_top_level(cfg: DictConfig, schema: Mapping[str, Any], sections: tuple[str, ...]) -> None:
    """Unknown top-level keys (a typo such as `sed=1`) and the types of the known ones."""
    unknown = [k for k in cfg if k not in schema and k not in sections]
    if unknown:
        raise ConfigError(f"unknown top-level config key(s) {', '.join(map(str, unknown))}; known: "
                          f"{', '.join(list(schema) + [s for s in sections if s in cfg])}")
    for key, annotation in schema.items():
        if key in cfg and (err := _type_error(key, _resolved(cfg, key), annotation)):  # `in` is false for ???
            raise ConfigError(err)
    seed = cfg.get("seed")
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"seed must be an integer in [0, {SEED_MAX}] or null (unseeded), got {seed}")
    if "task_name" in cfg and not str(cfg.task_name).strip():
        raise ConfigError("task_name must be a non-empty string (it names the folder under outputs/)")


def validate_eval_config(cfg: DictConfig) -> None:
    """Check a composed `latentlab-eval` config's top level, trainer, loggers and paths (its `eval` section is
    checked where it is read: `Analyses.from_config`, `NLLSettings.coerce`)."""
    _validate_top_level(cfg, EVAL_TOP_LEVEL, EVAL_SECTIONS)
    _validate_trainer(cfg)
    _validate_targets_and_paths(cfg, ("callbacks", "logger"))


def validate_config(cfg: DictConfig) -> None:
    """Check every value of a composed `latentlab-train` config; raise the first problem as `ConfigError`."""
    _validate_top_level(cfg, TOP_LEVEL, SECTIONS)

    for section in ("data", "model"):
        node = cfg.get(section)
        if node is None or "_target_" not in node:
            continue  # the builders say "no dataset/model selected"
        if err := _target_error(section, _resolved(cfg, section)):
            raise ConfigError(err)
    if cfg.get("net") is not None:
        from latentlab.nets import NetSpec

        if err := _type_error("net", _resolved(cfg, "net"), NetSpec):
            raise ConfigError(err)
    _validate_trainer(cfg)
    for key in ("nll", "val_nll"):  # conf/eval/nll/: checked here, before anything is written
        if (cfg.get("eval") or {}).get(key) is not None:
            from latentlab.estimators import NLLSettings

            NLLSettings.coerce(_resolved(cfg, f"eval.{key}"))
    _validate_targets_and_paths(cfg, ("callbacks", "logger"))


def _validate_targets_and_paths(cfg: DictConfig, groups: tuple[str, ...]) -> None:
    """Each `_target_` node of `groups` against its signature, and `paths` as path strings."""
    for group in groups:
        for name, node in (cfg.get(group) or {}).items():
            if node is None:
                continue
            if not isinstance(node, DictConfig) or "_target_" not in node:
                raise ConfigError(f"{group}.{name} must be a mapping with a _target_ (or null to disable it), got {node!r}")
            if err := _target_error(f"{group}.{name}", _resolved(cfg, f"{group}.{name}")):
                raise ConfigError(err)
    if "paths" in cfg:
        for key in ("data_dir", "output_dir"):
            value = _resolved(cfg, f"paths.{key}") if key in cfg.paths and not _needs_hydra(cfg.paths, key) else ""
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"paths.{key} must be a path string, got {value!r}")


def _needs_hydra(node: DictConfig, key: str) -> bool:
    """`${hydra:...}` only resolves inside a Hydra app (not in `compose` tests before output_dir is set)."""
    from hydra.core.hydra_config import HydraConfig

    raw = OmegaConf.to_container(node, resolve=False).get(key)  # type: ignore[union-attr]
    return isinstance(raw, str) and "${hydra:" in raw and not HydraConfig.initialized()


def _validate_trainer(cfg: DictConfig) -> None:
    node = cfg.get("trainer")
    if node is None:
        raise ConfigError("no trainer config: keep trainer=default (or cpu/gpu)")
    trainer = {k: v for k, v in _resolved_trainer(cfg).items()}
    if err := _target_error("trainer", trainer):
        raise ConfigError(err)
    for key in TRAINER_RANGES:
        if key in trainer and (err := trainer_value_error(key, trainer[key])):
            raise ConfigError(err)


def trainer_value_error(key: str, value: Any) -> str | None:
    """What is wrong with `trainer.<key>=value` by `TRAINER_RANGES` (None: fine, or a key it does not check); shared
    with latentlab-cli, which checks the precision with it."""
    check = TRAINER_RANGES.get(key)
    allowed = check(value) if check is not None else None
    return f"trainer.{key} must be {allowed}, got {value!r}" if allowed else None


def _resolved_trainer(cfg: DictConfig) -> dict[str, Any]:
    """The trainer section without `default_root_dir`, which may need Hydra's runtime to resolve."""
    node = cfg.trainer
    keys = [k for k in node if not (k == "default_root_dir" and _needs_hydra(node, k))]
    return {k: _resolved(cfg, f"trainer.{k}") for k in keys}


def check_model_against_trainer(cfg: DictConfig | Mapping[str, Any], model: Any) -> None:
    """Combinations only the built model can tell: float16 training where a method's gradients bypass Lightning's
    loss scaler; clipping and accumulation, which Lightning does only under automatic optimisation."""
    trainer = cfg.get("trainer") or {}
    method = getattr(model, "method", "this method")
    if str(trainer.get("precision")) in ("16-mixed", "16") and not getattr(model, "float16_training", True):
        raise ConfigError(f"trainer.precision={trainer.get('precision')} does not work with {method}: its Langevin "
                          "E-step takes gradients in z that Lightning's float16 loss scaler never sees (they underflow "
                          "or overflow); use bf16-mixed (float32's exponent range) or 32-true")
    if getattr(model, "automatic_optimization", True):
        return
    if clip := trainer.get("gradient_clip_val"):
        raise ConfigError(f"trainer.gradient_clip_val={clip} does not work with {method} (it optimises manually, with "
                          f"its own optimisers); use callbacks.numerics.gradient_clip_val={clip} instead, which clips "
                          "each optimiser's gradients for every method")
    if (accumulate := trainer.get("accumulate_grad_batches") or 1) != 1:
        raise ConfigError(f"trainer.accumulate_grad_batches={accumulate} does not work with {method} (it optimises "
                          "manually, with its own optimisers, one step a batch); raise data.batch_size instead")
