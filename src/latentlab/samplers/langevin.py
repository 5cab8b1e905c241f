"""Langevin samplers for ALMOND's E-step and for any differentiable log-density over latents.

The move is ALMOND's (Qiu & Wang 2020) discretised Langevin diffusion

    z <- z + s * grad log p(z | x) + sqrt(2 s) * N(0, I),

where grad log p(z | x) = grad_z log p(x, z) because log p(x) does not depend on z. Three samplers:

- `ULA`: the move as is (Roberts & Tweedie 1996). O(s) bias, one forward+backward per step.
- `MALA`: the move as a Metropolis-Hastings proposal (exact target), per-chain step sizes adapted
  toward an acceptance rate (Robbins-Monro on log s, Andrieu & Thoms 2008) during a warm-up window
  counted per chain across calls, then frozen, so persistent chains end up with an invariant kernel; it
  reuses log-prob and gradient at the accepted point, so it too costs one forward+backward per step
  (plus one at z0).
- `AnnealedLangevin` (samplers/annealed.py): ULA through a decreasing ladder of temperatures or noise levels with
  Song & Ermon's (2019) step scaling, for chains that start far from (or between) posterior modes.

Everything is vectorised over any leading shape of z, typically (n_chains, batch, d); step sizes are
per chain (shape z.shape[:-1]). Gradients are taken w.r.t. z only (`torch.autograd.grad`), so model
parameters never get a `.grad`, and sampling works when the caller is under `torch.no_grad()`.
All randomness goes through the optional `torch.Generator`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

LogProb = Callable[[Tensor], Tensor]
"""z (..., d) -> log-density up to a constant, shape (...)."""

NoiseLogProb = Callable[[Tensor, float], Tensor]
"""(z, sigma) -> log-density of the target convolved with N(0, sigma^2 I) (Song & Ermon's p_sigma)."""


@dataclass
class SamplerResult:
    """What a sampler hands back.

    z: final state, shaped like z0. samples: states kept after burn-in/thinning, (n_kept, *z.shape),
    or None unless `keep_samples=True`. step_size: final per-chain step sizes, z.shape[:-1] (pass it
    back as `step_size=` to continue persistent chains). step_count: per-chain moves made so far, the
    call's `step_count` plus n_steps (pass it back as `step_count=`: MALA's adaptation window and rate
    are indexed by it). diagnostics: floats and tensors, see the sampler's docstring.
    """

    z: Tensor
    step_size: Tensor
    samples: Tensor | None = None
    diagnostics: dict[str, float | Tensor] = field(default_factory=dict)
    step_count: Tensor | None = None


def value_and_grad(log_prob: LogProb, z: Tensor) -> tuple[Tensor, Tensor]:
    """log_prob(z) and its gradient w.r.t. z only: one forward and one backward.

    `autograd.grad` with `inputs=z` never accumulates into parameters' `.grad` and lets the engine
    skip parameter gradients; `enable_grad` makes it work under a caller's `no_grad`. Summing over
    chains is exact because each chain's log-density depends on its own z only.
    """
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        lp = log_prob(leaf)
        if lp.shape != z.shape[:-1]:
            raise ValueError(f"log_prob must map z of shape {tuple(z.shape)} to {tuple(z.shape[:-1])}, got {tuple(lp.shape)}")
        (grad,) = torch.autograd.grad(lp.sum(), leaf)
    return lp.detach(), grad


def _langevin_move(z: Tensor, grad: Tensor, step: Tensor, noise_scale: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """z + step * grad + noise_scale * xi with two allocations (xi, result); returns (z_new, xi)."""
    xi = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
    return torch.addcmul(z, grad, step).addcmul_(xi, noise_scale), xi


class _Recorder:
    """Keeps states after burn-in, every `thin`-th, into one preallocated tensor (no per-step lists).

    `__call__(t, z)` is given the state after t moves of the recorded segment (t = 1..n_steps).
    """

    def __init__(self, n_steps: int, burn_in: int, thin: int, like: Tensor, keep: bool) -> None:
        self.burn_in, self.thin = burn_in, thin
        n_kept = (n_steps - burn_in) // thin
        self.samples = like.new_empty((n_kept, *like.shape)) if keep and n_kept > 0 else None

    def __call__(self, t: int, z: Tensor) -> None:
        if self.samples is None or t <= self.burn_in or (t - self.burn_in) % self.thin:
            return
        self.samples[(t - self.burn_in) // self.thin - 1].copy_(z)


class _Stats:
    """Running diagnostics kept as device tensors: no `.item()` sync until `finish`."""

    def __init__(self, z: Tensor) -> None:
        self.grad_norm = z.new_zeros(())
        self.n_grad = 0
        self.nonfinite = torch.zeros(z.shape[:-1], dtype=torch.long, device=z.device)

    def add_grad(self, grad: Tensor) -> None:
        self.grad_norm += torch.linalg.vector_norm(grad, dim=-1).mean()
        self.n_grad += 1

    def finish(self) -> dict[str, float | Tensor]:
        """0-d tensors on z's device (read them with float() when needed: no host sync per sampler call)."""
        return {
            "grad_norm": self.grad_norm / max(self.n_grad, 1),
            "n_nonfinite": self.nonfinite.sum().to(self.grad_norm.dtype),
            "nonfinite_per_chain": self.nonfinite,
        }


def _finite(z: Tensor, lp: Tensor, grad: Tensor) -> Tensor:
    """Per chain: z, log-prob and gradient all finite."""
    return torch.isfinite(lp) & torch.isfinite(z).all(-1) & torch.isfinite(grad).all(-1)


class _Step(NamedTuple):
    """One unadjusted step: its target, its step-size multiplier, and (annealing) the AIS coefficient
    applied to the target's log-prob at the state it starts from."""

    target: LogProb
    multiplier: float
    weight_coef: float = 0.0


class LangevinSampler:
    """Shared configuration and the unadjusted Langevin loop used by ULA and AnnealedLangevin."""

    def __init__(self, step_size: float | Tensor, n_steps: int, burn_in: int = 0, thin: int = 1, guard: bool = False) -> None:
        if isinstance(step_size, Tensor):
            if not bool((step_size > 0).all()):
                raise ValueError("step_size must be > 0 for every chain")
        elif not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        if not 0 <= burn_in < n_steps:
            raise ValueError(f"burn_in must be in [0, n_steps={n_steps}), got {burn_in}")
        if thin < 1:
            raise ValueError(f"thin must be >= 1, got {thin}")
        self.step_size = step_size
        self.n_steps = int(n_steps)
        self.burn_in = int(burn_in)
        self.thin = int(thin)
        self.guard = bool(guard)

    #: whether per-chain step sizes change along a run (then a caller persisting chains keeps them)
    adaptive: bool = False

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    def with_steps(self, n_steps: int) -> "LangevinSampler":
        """The same sampler making `n_steps` moves per call (burn-in kept only if it still fits)."""
        other = copy.copy(self)
        other.n_steps = int(n_steps)
        other.burn_in = self.burn_in if self.burn_in < other.n_steps else 0
        if other.n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        return other

    @staticmethod
    def _counts(z: Tensor, step_count: Tensor | None) -> Tensor:
        """Per-chain moves made before this call, z.shape[:-1] (zeros for fresh chains)."""
        if step_count is None:
            return torch.zeros(z.shape[:-1], dtype=torch.long, device=z.device)
        return step_count.to(device=z.device, dtype=torch.long).expand(z.shape[:-1])

    def _initial_step(self, z: Tensor, step_size: float | Tensor | None) -> Tensor:
        """Per-chain step sizes, shape z.shape[:-1], from the call's override or the constructor's."""
        step = self.step_size if step_size is None else step_size
        message = "step_size must be > 0 for every chain"
        if not isinstance(step, Tensor):
            if not float(step) > 0:
                raise ValueError(message)
        elif step.device.type == "cpu":
            if not bool((step > 0).all()):
                raise ValueError(message)
        else:  # checked on the device, not read back: the error comes at the next sync
            torch._assert_async((step > 0).all(), message)
        step = torch.as_tensor(step, dtype=z.dtype, device=z.device)
        return step.expand(z.shape[:-1]).clone()

    def _run_unadjusted(
        self,
        plan: Sequence[_Step],
        z: Tensor,
        step: Tensor,
        generator: torch.Generator | None,
        recorder: _Recorder,
        record_from: int,
    ) -> tuple[Tensor, Tensor, dict[str, float | Tensor]]:
        """Run `plan` (one entry per step) of unadjusted moves; exactly one forward+backward per step.

        A target with a `score` (a `JointDensity`) gives the gradient alone when neither the guard nor an AIS
        weight needs the log-prob; non-finite chain-steps are then those with a non-finite gradient.
        Guard: a state whose z, log-prob or gradient is non-finite is found when it is evaluated at
        the next step; that chain is put back to its previous state (whose gradient is kept) and its
        step size halved, so the cost stays one evaluation per step plus one final check. States are
        recorded after that check. A chain put back at a level's first step (annealing) keeps the
        previous level's log-prob and gradient for that one step. Without the guard, non-finite
        log-probs are only counted and pass through. `record_from`: steps before the recorded segment.
        """
        stats = _Stats(z)
        log_weight = z.new_zeros(z.shape[:-1]) if any(s.weight_coef for s in plan) else None
        prev: tuple[Tensor, Tensor, Tensor] | None = None
        scales: tuple[float, Tensor, Tensor] | None = None  # (multiplier, step column, noise scale) cache
        for t, (target, multiplier, weight_coef) in enumerate(plan):
            if hasattr(target, "score") and not self.guard and not weight_coef:
                grad = target.score(z)  # a JointDensity's gradient alone: nothing here needs the log-density
                stats.nonfinite += ~torch.isfinite(grad).all(-1)
            else:
                lp, grad = value_and_grad(target, z)
                if self.guard:
                    z, lp, grad, step = self._check(z, lp, grad, step, prev, stats)
                    prev = (z, lp, grad)
                    scales = None  # step sizes may have been halved; recomputing is cheaper than a sync to find out
                else:
                    stats.nonfinite += ~torch.isfinite(lp)
            if t > record_from:
                recorder(t - record_from, z)
            if weight_coef:
                log_weight += weight_coef * lp
            stats.add_grad(grad)
            if scales is None or scales[0] != multiplier:
                col = step.unsqueeze(-1) * multiplier
                scales = (multiplier, col, (2.0 * col).sqrt())
            z, _ = _langevin_move(z, grad, scales[1], scales[2], generator)
        if self.guard:
            lp, grad = value_and_grad(plan[-1].target, z)
            z, lp, grad, step = self._check(z, lp, grad, step, prev, stats)
        recorder(len(plan) - record_from, z)
        diagnostics = stats.finish()
        if log_weight is not None:
            diagnostics["log_weights"] = log_weight
        return z, step, diagnostics

    @staticmethod
    def _check(
        z: Tensor, lp: Tensor, grad: Tensor, step: Tensor, prev: tuple[Tensor, Tensor, Tensor] | None, stats: _Stats
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Guard: revert non-finite chains to `prev` and halve their step (see `_run_unadjusted`)."""
        bad = ~_finite(z, lp, grad)
        stats.nonfinite += bad
        if prev is None:  # nothing to go back to: z0 itself is invalid; leave it to the caller's checks
            return z, lp, grad, step
        col = bad.unsqueeze(-1)
        z = torch.where(col, prev[0], z)
        lp = torch.where(bad, prev[1], lp)
        grad = torch.where(col, prev[2], grad)
        step = torch.where(bad, 0.5 * step, step)
        return z, lp, grad, step


class ULA(LangevinSampler):
    """Unadjusted Langevin algorithm, ALMOND's E-step kernel.

    For a Gaussian target with precision A its stationary law is N(m, (A (I - s A / 2))^{-1}): the
    O(s) bias that MALA removes. `step_schedule="poly"` decays s_t = s (1 + t / schedule_t0)^-gamma
    (Welling & Teh 2011's a (b + t)^-gamma, normalised so s_0 = s): the bias shrinks along the run.
    Diagnostics: `grad_norm` (mean ||grad|| over steps and chains), `n_nonfinite` (chain-steps the
    guard rejected, or that were non-finite at evaluation), `nonfinite_per_chain`; 0-d tensors on z's device, so a
    call reads nothing back to the host (float() them to print).
    """

    def __init__(
        self,
        step_size: float | Tensor,
        n_steps: int,
        burn_in: int = 0,
        thin: int = 1,
        step_schedule: str | None = None,
        guard: bool = False,
        schedule_gamma: float = 0.55,
        schedule_t0: float = 10.0,
    ) -> None:
        super().__init__(step_size, n_steps, burn_in, thin, guard)
        if step_schedule not in (None, "constant", "poly"):
            raise ValueError(f"step_schedule must be None, 'constant' or 'poly', got {step_schedule!r}")
        if step_schedule == "poly" and not (0.0 < schedule_gamma <= 1.0 and schedule_t0 > 0):
            raise ValueError("poly schedule needs 0 < schedule_gamma <= 1 and schedule_t0 > 0")
        self.step_schedule = step_schedule
        self.schedule_gamma = float(schedule_gamma)
        self.schedule_t0 = float(schedule_t0)

    def multipliers(self) -> list[float]:
        """Step-size multiplier of each step under the schedule."""
        if self.step_schedule == "poly":
            return [(1.0 + t / self.schedule_t0) ** -self.schedule_gamma for t in range(self.n_steps)]
        return [1.0] * self.n_steps

    @torch.no_grad()
    def sample(
        self,
        log_prob: LogProb,
        z0: Tensor,
        generator: torch.Generator | None = None,
        keep_samples: bool = False,
        step_size: float | Tensor | None = None,
        step_count: Tensor | None = None,
    ) -> SamplerResult:
        """Run `n_steps` ULA moves from z0 (..., d); `step_size` overrides the constructor's."""
        z = z0.detach()
        step = self._initial_step(z, step_size)
        recorder = _Recorder(self.n_steps, self.burn_in, self.thin, z, keep_samples)
        plan = [_Step(log_prob, m) for m in self.multipliers()]
        z, step, diagnostics = self._run_unadjusted(plan, z, step, generator, recorder, 0)
        return SamplerResult(z, step, recorder.samples, diagnostics, self._counts(z, step_count) + self.n_steps)


class MALA(LangevinSampler):
    """Metropolis-adjusted Langevin (Roberts & Tweedie 1996) with per-chain adaptive step sizes.

    Proposal z' = z + s grad(z) + sqrt(2 s) xi, accepted with probability
    min(1, p(z') q(z | z') / (p(z) q(z' | z))), q(b | a) = N(b; a + s grad(a), 2 s I).
    Adaptation (Andrieu & Thoms 2008): log s += adapt_rate (T + 1)^-adapt_decay (alpha - target) per
    chain, alpha its acceptance probability and T the chain's own move count over all calls
    (`step_count=` passed back from `result.step_count`), only while T < `adapt_window`; then the step
    is frozen and the kernel is exact MALA, invariant for the target. Adapting forever from the state
    is not: on persistent chains it shrinks a stiff direction's variance by ~8%. `adapt_window` None:
    `burn_in`, or n_steps when burn_in is 0 (one call from fresh chains adapts throughout).
    Non-finite proposals are always rejected (their acceptance probability is 0); `guard=True` also
    halves that chain's step. Diagnostics: `accept_rate` (mean acceptance probability over steps and
    chains; a 0-d tensor, as the ULA ones), `accept_rate_per_chain`, `grad_norm`, `n_nonfinite`, `nonfinite_per_chain`.
    """

    def __init__(
        self,
        step_size: float | Tensor,
        n_steps: int,
        burn_in: int = 0,
        thin: int = 1,
        target_accept: float = 0.574,
        adapt: bool = True,
        adapt_rate: float = 0.5,
        adapt_decay: float = 0.5,
        adapt_window: int | None = None,
        guard: bool = False,
    ) -> None:
        super().__init__(step_size, n_steps, burn_in, thin, guard)
        if not 0.0 < target_accept < 1.0:
            raise ValueError(f"target_accept must be in (0, 1), got {target_accept}")
        if adapt_rate <= 0 or not 0.5 <= adapt_decay <= 1.0:
            raise ValueError("adapt_rate must be > 0 and adapt_decay in [0.5, 1] (Robbins-Monro conditions)")
        if adapt_window is not None and int(adapt_window) < 0:
            raise ValueError(f"adapt_window must be >= 0 or None, got {adapt_window}")
        self.target_accept = float(target_accept)
        self.adapt = bool(adapt)
        self.adapt_rate = float(adapt_rate)
        self.adapt_decay = float(adapt_decay)
        self.adapt_window = None if adapt_window is None else int(adapt_window)

    @property
    def adaptive(self) -> bool:  # type: ignore[override]
        return self.adapt

    def window(self) -> int:
        """Moves per chain (counted over all calls) during which its step size adapts."""
        if not self.adapt:
            return 0
        return self.adapt_window if self.adapt_window is not None else (self.burn_in or self.n_steps)

    @torch.no_grad()
    def sample(
        self,
        log_prob: LogProb,
        z0: Tensor,
        generator: torch.Generator | None = None,
        keep_samples: bool = False,
        step_size: float | Tensor | None = None,
        step_count: Tensor | None = None,
    ) -> SamplerResult:
        """Run `n_steps` MALA transitions from z0 (..., d); `step_size` overrides the constructor's,
        `step_count` (moves each chain made before) indexes the adaptation."""
        z = z0.detach()
        step = self._initial_step(z, step_size).unsqueeze_(-1)  # a column, to broadcast against z
        count = self._counts(z, step_count)
        recorder = _Recorder(self.n_steps, self.burn_in, self.thin, z, keep_samples)
        stats = _Stats(z)
        accept_sum = z.new_zeros(z.shape[:-1])
        window = self.window()
        # rates (T + 1)^-decay for T = count .. count + n_steps - 1, zero once T >= window: one tensor, no syncs
        moves = count.unsqueeze(-1) + torch.arange(self.n_steps, device=z.device)
        rates = torch.where(moves < window, self.adapt_rate * (moves + 1.0).to(z.dtype) ** -self.adapt_decay, 0.0)
        adapting = window > 0
        lp, grad = value_and_grad(log_prob, z)
        for t in range(self.n_steps):
            proposal, xi = _langevin_move(z, grad, step, (2.0 * step).sqrt(), generator)
            lp_new, grad_new = value_and_grad(log_prob, proposal)
            # log q(z | z') - log q(z' | z); the forward residual is sqrt(2 s) xi, so its term is -|xi|^2 / 2.
            backward = torch.addcmul(z - proposal, grad_new, step, value=-1.0)
            log_ratio = lp_new - lp - backward.square().sum(-1) / (4.0 * step.squeeze(-1)) + 0.5 * xi.square().sum(-1)
            finite = torch.isfinite(log_ratio)  # NaN/inf in z', its log-prob or gradient all land here
            stats.nonfinite += ~finite
            accept_prob = torch.where(finite, log_ratio, -math.inf).clamp_(max=0.0).exp_()
            accept = torch.rand(accept_prob.shape, generator=generator, dtype=z.dtype, device=z.device) < accept_prob
            z = torch.where(accept.unsqueeze(-1), proposal, z)
            lp = torch.where(accept, lp_new, lp)
            grad = torch.where(accept.unsqueeze(-1), grad_new, grad)
            accept_sum += accept_prob
            stats.add_grad(grad)
            if adapting:  # Robbins-Monro on log s, applied multiplicatively; rate 0 outside the window
                step *= (rates[..., t] * (accept_prob - self.target_accept)).exp_().unsqueeze_(-1)
            if self.guard:
                step *= torch.where(finite, 1.0, 0.5).unsqueeze_(-1)
            recorder(t + 1, z)
        diagnostics = stats.finish()
        diagnostics["accept_rate_per_chain"] = accept_sum / self.n_steps
        diagnostics["accept_rate"] = accept_sum.mean() / self.n_steps
        return SamplerResult(z, step.squeeze(-1), recorder.samples, diagnostics, count + self.n_steps)
