"""Numerical faults: find NaN/inf where it starts, stop with a message that names it, never save it.

`NumericalGuard` (in `conf/callbacks/default.yaml` as `numerics`) checks, for every method and both
automatic and manual optimisation (AVB's two players, ALMOND's two phases):

- the loss, before each backward (`on_before_backward`): a non-finite loss is blamed on the component
  whose parameters are non-finite, else on the first component whose output became non-finite in
  this step (cheap forward hooks that flag without a device sync), else on the objective itself;
- the gradients, before each optimiser step (`on_before_optimizer_step`): one sum per gradient
  (NaN and inf survive a sum), and only on failure a per-parameter look to name the components;
- optional gradient clipping (`gradient_clip_val`, by norm or value) at that same point, per
  optimiser, which unlike `Trainer(gradient_clip_val=...)` also works with manual optimisation.

Reading a check's result is a host sync on an accelerator, where it would stall every step. So with
`check_every_n_steps` > 1 (`auto`: `trainer.log_every_n_steps` off the CPU, 1 on it, where a read is free) the
checks only record on the device the first step with a non-finite value, its kind and the components whose
gradients it reached; the flags are read every N batches, at each epoch's end and before each save. The run
then stops up to N - 1 batches later, naming the step the fault came in at, with no checkpoint written past it.

The checkpoint writer (`latentlab.checkpointing.AtomicCheckpointIO`) refuses non-finite checkpoints,
so the last good `last.ckpt` stays; ALMOND's Langevin states are checked by ALMOND itself (its
`sampler.guard` rejects and shrinks diverging moves instead). `FaultInjector` puts a NaN into a
chosen component at a chosen step: it is how the tests and `benchmarks/faults.py` prove the above.
"""

from __future__ import annotations

import math
import os
import signal as signals
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as L
import torch
from torch import Tensor, nn

from latentlab.errors import ConfigError, NumericalError
from latentlab.models.base import LatentVariableModel

CLIP_ALGORITHMS = ("norm", "value")
LOSS, GRADIENT = 0, 1  # kinds of a deferred finding


def model_components(pl_module: nn.Module) -> dict[str, nn.Module]:
    """The method's named parts (`LatentVariableModel.components()`), else its top-level children."""
    return pl_module.components() if isinstance(pl_module, LatentVariableModel) else dict(pl_module.named_children())


class ComponentMap:
    """Parameter -> component name ("encoder", "decoder", ...), by identity, for messages."""

    def __init__(self, pl_module: nn.Module) -> None:
        self.parts = model_components(pl_module)
        self._by_param = {id(p): name for name, module in self.parts.items() for p in module.parameters()}
        self._names = {id(p): name for name, p in pl_module.named_parameters()}

    def of(self, param: Tensor) -> str:
        return self._by_param.get(id(param), self._names.get(id(param), "?").split(".")[0])

    def name(self, param: Tensor) -> str:
        return self._names.get(id(param), "?")

    def nonfinite_parameters(self) -> dict[str, list[str]]:
        """{component: [parameter names]} of parameters holding NaN/inf."""
        out: dict[str, list[str]] = {}
        for name, module in self.parts.items():
            for p in module.parameters():
                if not bool(torch.isfinite(p).all()):
                    out.setdefault(name, []).append(self.name(p))
        return out


def _tensors(obj: Any) -> Iterable[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply `fn` to every floating tensor in a (named)tuple/list/dict output, keeping its structure."""
    if isinstance(obj, Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        items = [_map_tensors(o, fn) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _entry_bounds(grads: list[Tensor]) -> Tensor:
    """(len(grads),), without a host read: non-finite exactly when some entry of that gradient is (for the deferred
    checks, where the gradients are gone by the time the flags are read, and for one read on an accelerator). On
    accelerators the largest |entry| (one fused kernel; a max never overflows); on CPU a float64 sum (NaN and inf
    survive any sum, and float64 cannot overflow on float32 or half gradients)."""
    device = grads[0].device
    if device.type != "cpu":
        return torch.stack([n.to(device) for n in torch._foreach_norm(grads, math.inf)])
    return torch.stack([g.sum(dtype=torch.float64) for g in grads])


def _all_finite_now(grads: list[Tensor]) -> bool:
    """Whether the gradients look finite, read now (a finite-gradient sum may overflow: the caller rechecks entry by
    entry). On CPU each gradient's sum (half ones in float32) goes straight into a Python float: fewer dispatches than
    stacking the sums on the device first, ~195 against 258 us in a step of the MNIST VAE (2 threads, 2026-12-07),
    where each op after the backward pass meets cold caches; elsewhere the stacked bounds, read once (one host sync
    instead of one each)."""
    if not grads[0].is_cpu:
        return math.isfinite(float(_entry_bounds(grads).sum()))
    return math.isfinite(sum(g.sum(dtype=torch.promote_types(g.dtype, torch.float32)).item() for g in grads))


def _where(trainer: L.Trainer) -> str:
    batch = trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1
    return f"training step {trainer.global_step} (epoch {trainer.current_epoch}, batch {max(batch, 0)})"


class NumericalGuard(L.Callback):
    """Stop training at the first NaN/inf in a loss or gradient, naming the step and the component;
    optionally clip gradients. See the module docstring."""

    def __init__(self, check_loss: bool = True, check_grads: bool = True, locate: bool = False,
                 gradient_clip_val: float | None = None, gradient_clip_algorithm: str = "norm",
                 check_every_n_steps: int | str = "auto") -> None:
        if check_every_n_steps != "auto" and (isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int)
                                              or check_every_n_steps < 1):
            raise ConfigError(f"callbacks.numerics.check_every_n_steps must be an integer >= 1 or auto, got {check_every_n_steps!r}")
        if gradient_clip_val is not None and (isinstance(gradient_clip_val, bool) or not float(gradient_clip_val) > 0):
            raise ConfigError(f"callbacks.numerics.gradient_clip_val must be > 0 or null (no clipping), got {gradient_clip_val!r}")
        if gradient_clip_algorithm not in CLIP_ALGORITHMS:
            raise ConfigError(f"callbacks.numerics.gradient_clip_algorithm must be one of {'|'.join(CLIP_ALGORITHMS)}, "
                              f"got {gradient_clip_algorithm!r}")
        self.check_loss, self.check_grads, self.locate = bool(check_loss), bool(check_grads), bool(locate)
        self.gradient_clip_val = None if gradient_clip_val is None else float(gradient_clip_val)
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self._map: ComponentMap | None = None
        self._hooks: list[Any] = []
        self._flags: list[tuple[str, Tensor]] = []  # (component, "output not finite") per forward call this step
        self.check_every_n_steps = check_every_n_steps
        self._every = 1  # resolved at fit start
        self._batches = 0
        # deferred checks: the first non-finite value's training step (-1: none yet), kind and components, on the device
        self._bad: tuple[Tensor, Tensor, Tensor] | None = None
        self._part_index: dict[tuple[int, ...], Tensor] = {}  # parameters -> the component index of each

    # ----- set-up -----------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._map = ComponentMap(pl_module)
        self._every = self.check_every_n_steps if isinstance(self.check_every_n_steps, int) else (
            1 if pl_module.device.type == "cpu" else max(1, int(trainer.log_every_n_steps)))
        self._batches, self._bad, self._part_index = 0, None, {}
        if self.locate:
            for name, module in self._map.parts.items():
                self._hooks.append(module.register_forward_hook(self._flagger(name)))

    def _flagger(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not module.training:
                return
            bad_out = [~torch.isfinite(t.detach()).all() for t in _tensors(output) if t.is_floating_point()]
            if not bad_out:
                return
            bad_in = [~torch.isfinite(t.detach()).all() for t in _tensors(args) if t.is_floating_point()]
            # the origin is where values turn non-finite: a non-finite output from finite inputs (no sync here)
            origin = torch.stack(bad_out).any() & ~(torch.stack(bad_in).any() if bad_in else torch.tensor(False))
            self._flags.append((name, origin))
        return hook

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._flags.clear()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._flags.clear()

    # ----- checks -----------------------------------------------------------------------------
    def blame(self) -> str:
        """Which component a non-finite value comes from, as far as can be told now."""
        assert self._map is not None
        bad_params = self._map.nonfinite_parameters()
        if bad_params:
            parts = "; ".join(f"{c} ({', '.join(ps[:3])}{' ...' if len(ps) > 3 else ''})" for c, ps in bad_params.items())
            return f"component {', '.join(bad_params)}: non-finite parameters in {parts}"
        for name, flag in self._flags:
            if bool(flag):
                return f"component {name}: its output became non-finite from finite inputs (its parameters are finite)"
        if not self.locate:
            return ("all parameters are finite; rerun with callbacks.numerics.locate=true to find the component ("
                    + ", ".join(self._map.parts) + ") whose output went non-finite first")
        return ("no component (" + ", ".join(self._map.parts) + ") turned finite inputs into non-finite outputs and all "
                "parameters are finite: the values came in non-finite (e.g. sampler states) or the objective overflowed")

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        if not self.check_loss:
            return
        if self._every > 1:
            self._record(~torch.isfinite(loss.detach()).all(), trainer.global_step, LOSS)
            return
        # a scalar loss is read once (11 against 65 us in situ for isfinite + all + bool, 2026-12-07)
        finite = math.isfinite(float(loss)) if loss.numel() == 1 else bool(torch.isfinite(loss.detach()).all())
        bad_ranks: list[int] = []
        if trainer.world_size > 1:
            # every rank must stop at this same step: a rank that raised alone would leave the others
            # waiting in the gradient all-reduce; one all-gather of a flag per backward tells them all
            flag = torch.tensor(int(finite), dtype=torch.int32, device=loss.device)
            flags = trainer.strategy.all_gather(flag).reshape(-1)
            bad_ranks = [r for r, ok in enumerate(flags.tolist()) if not ok]
            if not bad_ranks:
                return
        elif finite:
            return
        method = getattr(pl_module, "method", type(pl_module).__name__)
        where = f" on rank {', '.join(map(str, bad_ranks))} of {trainer.world_size}" if bad_ranks else ""
        detail = self.blame() if not finite else "diagnosis on that rank (this rank's loss was finite)"
        value = f" ({float(loss.detach().float().sum())})" if not finite else ""
        exc = NumericalError(f"non-finite loss{value} at {_where(trainer)}{where} of {method}; {detail}")
        exc.diagnosed = True  # type: ignore[attr-defined]
        raise exc

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        clip_norm = self.gradient_clip_val is not None and self.gradient_clip_algorithm == "norm"
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0) if clip_norm else None
        if self.check_grads and self._every > 1:
            self._record_gradients(trainer, params, grads)
        elif self.check_grads and not (math.isfinite(float(norm)) if norm is not None else _all_finite_now(grads)):
            self._raise_on_gradients(trainer, pl_module, params)
        if self.gradient_clip_val is not None:
            if self.gradient_clip_algorithm == "norm":
                torch.nn.utils.clip_grads_with_norm_(params, self.gradient_clip_val, norm)  # type: ignore[arg-type]
            else:
                torch.nn.utils.clip_grad_value_(params, self.gradient_clip_val)

    # ----- deferred checks (accelerators): flags kept on the device, read every `_every` batches --------------
    def _record(self, bad: Tensor, step: int, kind: int, parts: Tensor | None = None) -> None:
        """Remember the first step whose value is non-finite, without reading anything back to the host."""
        assert self._map is not None
        if self._bad is None:
            self._bad = (torch.full((), -1, dtype=torch.long, device=bad.device), torch.zeros((), dtype=torch.long, device=bad.device),
                         torch.zeros(len(self._map.parts) + 1, dtype=torch.bool, device=bad.device))
        first, what, where = self._bad
        new = bad & (first < 0)
        self._bad = (torch.where(new, step, first), torch.where(new, kind, what),
                     where if parts is None else torch.where(new, parts, where))

    def _record_gradients(self, trainer: L.Trainer, params: list[Tensor], grads: list[Tensor]) -> None:
        """Per component (the last slot: parameters outside every component), whether a gradient entry is non-finite."""
        assert self._map is not None
        names = list(self._map.parts)
        key = tuple(map(id, params))  # the parameters with a gradient this step
        index = self._part_index.get(key)
        if index is None:
            slots = [names.index(c) if c in names else len(names) for c in map(self._map.of, params)]
            index = self._part_index[key] = torch.tensor(slots, device=grads[0].device)
        bad = ~torch.isfinite(_entry_bounds(grads))
        parts = torch.zeros(len(names) + 1, dtype=torch.long, device=bad.device).index_add_(0, index, bad.long()) > 0
        self._record(parts.any(), trainer.global_step, GRADIENT, parts)

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule, collective: bool = True) -> None:
        """Read the deferred flags (one sync; under DDP one all-gather, so that every rank stops together)."""
        if self._every == 1 or self._bad is None:
            return
        first = self._bad[0]
        if trainer.world_size > 1:
            if not collective:
                return
            steps = trainer.strategy.all_gather(first).reshape(-1).tolist()
        else:
            steps = [int(first)]
        if max(steps) < 0:
            return
        method = getattr(pl_module, "method", type(pl_module).__name__)
        rank = trainer.global_rank if trainer.world_size > 1 else 0
        step = steps[rank]
        found = (f"found at {_where(trainer)}: the guard reads its flags every {self._every} batches on "
                 f"{first.device.type}; callbacks.numerics.check_every_n_steps=1 stops at the step itself")
        if step < 0:
            bad_ranks = [r for r, s in enumerate(steps) if s >= 0]
            message = f"non-finite value on rank {', '.join(map(str, bad_ranks))} of {trainer.world_size} ({found})"
        elif int(self._bad[1]) == LOSS:
            message = f"non-finite loss at training step {step} of {method} ({found} and names the component)"
        else:
            assert self._map is not None
            names = [*self._map.parts, "other parameters"]
            parts = [n for n, flag in zip(names, self._bad[2].tolist(), strict=True) if flag]
            message = (f"non-finite gradient at training step {step} of {method}; component {', '.join(parts)} ({found}); "
                       "lower the learning rate or clip gradients with callbacks.numerics.gradient_clip_val")
        exc = NumericalError(message)
        exc.diagnosed = True  # type: ignore[attr-defined]
        raise exc

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batches += 1
        if self._batches % self._every == 0:
            self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._check(trainer, pl_module, collective=False)  # this process's flags: a save need not run on every rank

    def _raise_on_gradients(self, trainer: L.Trainer, pl_module: L.LightningModule, params: list[Tensor]) -> None:
        assert self._map is not None
        bad: dict[str, list[str]] = {}
        for p in params:
            if not bool(torch.isfinite(p.grad).all()):  # type: ignore[arg-type]
                bad.setdefault(self._map.of(p), []).append(self._map.name(p))
        if not bad:
            return  # finite gradients whose sum or norm overflowed float32: nothing to stop for
        where = "; ".join(f"{c} ({', '.join(n[:3])}{' ...' if len(n) > 3 else ''})" for c, n in bad.items())
        exc = NumericalError(f"non-finite gradient at {_where(trainer)} of "
                             f"{getattr(pl_module, 'method', type(pl_module).__name__)}; component {', '.join(bad)}: "
                             f"non-finite gradients of {where} (the loss was finite); lower the learning rate "
                             "or clip gradients with callbacks.numerics.gradient_clip_val")
        exc.diagnosed = True  # type: ignore[attr-defined]
        raise exc


def explain_numerical_error(exc: BaseException, pl_module: nn.Module | None, last_good: str | None,
                            guard: NumericalGuard | None = None) -> str:
    """The message a user sees: the detector's own words (a model's own check names e.g. ALMOND's
    sampler), the guard's diagnosis of where the values first turned non-finite when the detector was
    not the guard, the last good checkpoint (kept), and how to go on."""
    message = str(exc)
    if not getattr(exc, "diagnosed", False):
        if guard is not None and guard._map is not None:
            message += f"; diagnosis: {guard.blame()}"
        elif pl_module is not None:
            bad = ComponentMap(pl_module).nonfinite_parameters()
            message += f"; diagnosis: component {', '.join(bad)}: non-finite parameters" if bad else \
                "; diagnosis: all parameters are still finite"
    fix = ("fix the cause (learning rate, callbacks.numerics.gradient_clip_val, sampler.guard / sampler.step_size "
           "for ALMOND)")
    if last_good is None:
        return f"{message}. No checkpoint was written before the failure; {fix} and start again"
    return f"{message}. Last good checkpoint: {last_good}, kept unchanged; {fix} and resume with ckpt_path=<that checkpoint>"


FAULT_KINDS = ("param", "output", "grad", "state")


class FaultInjector(L.Callback):
    """Put NaN (or `value`) into one component at one training step, to test that faults are caught.

    kinds: `param` (overwrite a parameter entry at the start of step `at_step`, or at its end with
    `after_step=True`, i.e. after the optimiser step and before that step's checkpoint), `output`
    (the component's forward output in that step), `grad` (its parameter's gradient in that step),
    `state` (ALMOND's persistent Langevin chains; component `sampler`).
    """

    def __init__(self, component: str, at_step: int, kind: str = "param", value: float = float("nan"),
                 after_step: bool = False, rank: int | None = None) -> None:
        if kind not in FAULT_KINDS:
            raise ConfigError(f"FaultInjector kind must be one of {'|'.join(FAULT_KINDS)}, got {kind!r}")
        self.component, self.at_step, self.kind = component, int(at_step), kind
        self.value, self.after_step = float(value), bool(after_step)
        self.rank = rank  # only this DDP rank (None: every rank)
        self.fired = False
        self._handles: list[Any] = []

    def _module(self, pl_module: nn.Module) -> nn.Module:
        parts = model_components(pl_module)
        if self.component not in parts:
            raise ConfigError(f"FaultInjector: {type(pl_module).__name__} has no component {self.component!r}; "
                              f"it has {', '.join(parts)}")
        return parts[self.component]

    def _poison(self, t: Tensor) -> Tensor:
        """t + value: every entry becomes NaN (inf), and the graph through t is kept, as in a real overflow."""
        return t + self.value

    def _inject(self, pl_module: L.LightningModule) -> None:
        self.fired = True
        if self.kind == "state":
            chains = getattr(pl_module, "chains", None)
            if chains is None:
                raise ConfigError(f"FaultInjector kind=state needs a method with Langevin chains (ALMOND), "
                                  f"not {type(pl_module).__name__}")
            chains.fill_(self.value)
            return
        module = self._module(pl_module)
        param = next(module.parameters())
        if self.kind == "param":
            with torch.no_grad():
                param.view(-1)[0] = self.value
        elif self.kind == "grad":
            self._handles.append(param.register_hook(self._poison))
        else:
            # prepend: the poisoned output is what the module itself returns, as later hooks (the guard's) see it
            self._handles.append(module.register_forward_hook(
                lambda m, args, out: _map_tensors(out, self._poison) if m.training else out, prepend=True))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if not self.fired and not self.after_step and trainer.global_step >= self.at_step:
            self._inject(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if not self.fired and self.after_step and trainer.global_step >= self.at_step:
            self._inject(pl_module)


class SendSignal(L.Callback):
    """Send `signal` (e.g. SIGTERM, a preemption) to this process once training reaches step `at_step`:
    a preemption at a known point, for tests and `benchmarks/faults.py`. A run resumed past that step
    (which rebuilds this callback from its saved config) does not send it again."""

    def __init__(self, at_step: int, signal: str = "SIGTERM", in_validation: bool = False) -> None:
        if not hasattr(signals, signal):
            raise ConfigError(f"SendSignal signal must name a signal such as SIGTERM, got {signal!r}")
        self.at_step, self.signal = int(at_step), getattr(signals, signal)
        self.in_validation = bool(in_validation)  # send it during the first validation batch after the step
        self._armed = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._armed = trainer.global_step < self.at_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.in_validation:
            self._send(trainer)

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if self.in_validation and not trainer.sanity_checking:
            self._send(trainer)

    def _send(self, trainer: L.Trainer) -> None:
        if self._armed and trainer.global_step >= self.at_step:
            self._armed = False
            os.kill(os.getpid(), self.signal)
