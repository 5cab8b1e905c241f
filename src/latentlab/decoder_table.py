"""A decoder of a 1-d latent as a verified cubic Hermite table: Langevin moves at the cost of a table look-up.

With latent_dim = 1 (the many-normal-means problem, empirical Bayes deconvolution) the decoder is a curve
z -> params in R^P, and it stays the same through all K moves of an E-step: ALMOND's mixture run evaluates one
50-100-50 network 10^6 times per epoch at points of one line. Evaluated once per E-step on a grid instead, in
float64 with its slope (forward mode), the cubic Hermite interpolant between grid points spaced h apart is off by
at most h^4 |f''''| / 384 in value and sqrt(3) h^3 |f''''| / 216 in slope.

The table is only used where it is verified at least as accurate as the float32 decoder it replaces. At one point
inside every interval, a third of the way (where the leading error terms, t^2 (1-t)^2 in value and t (1-t) (1-2t)
in slope, reach 79% and 77% of their peaks; both are symmetric about the middle), its value and slope, their errors
counted 1.3 times, must be within the float32 decoder's own largest error over the grid of the float64 one (or
float32's epsilon times the curve's scale). Otherwise h shrinks by the power of 2 that the error ratio asks for
(slope errors scale as h^3), up to `max_points`; past that `build` gives up (None) and the caller keeps the
decoder. So a chain moved through the table is the chain moved through the network, to float32 rounding.

A z outside [lo, hi] is decoded by the network itself (found with one host read per call). The table holds
7 x P float64s per interval; `params` is differentiable in z (the interpolant's slope), not in the parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from latentlab.generative import GenerativeModel, JointDensity

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
CHECK_POINTS = (1 / 3,)  # fractions of an interval where the table is compared with the float64 decoder
PEAK_RATIO = 1.3  # errors there times this bound their peaks within the interval (1 / 0.77)


def _curve(decoder: nn.Module, dtype: torch.dtype) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """z (n, 1) -> (decoder(z), d decoder / dz), both (n, P), with the decoder's weights cast to `dtype`."""
    state = {k: v.detach().to(dtype, copy=True) for k, v in [*decoder.named_parameters(), *decoder.named_buffers()]}

    def values_and_slopes(z: Tensor) -> tuple[Tensor, Tensor]:
        z = z.to(dtype)
        with torch.autocast(z.device.type, enabled=False):  # a bf16-mixed run's autocast would round the "float64"
            return jvp(lambda u: functional_call(decoder, state, (u,)), (z,), (torch.ones_like(z),))

    return values_and_slopes


class _Interpolate(torch.autograd.Function):
    """The table's value at z (N, 1) in z's dtype, its gradient the interpolant's slope (float64 arithmetic)."""

    @staticmethod
    def forward(ctx, z: Tensor, table: "DecoderTable") -> Tensor:  # type: ignore[override]
        value, slope = table.evaluate(z)
        ctx.save_for_backward(slope.to(z.dtype))
        return value.to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (slope,) = ctx.saved_tensors
        return (grad * slope).sum(-1, keepdim=True), None


class DecoderTable:
    """A 1-d latent's decoder on [lo, lo + spacing * intervals] as per-interval polynomials in t in [0, 1]: each
    row of `coefficients` (intervals, 7, P) holds the value's c0 + c1 t + c2 t^2 + c3 t^3, then its slope in z's."""

    def __init__(self, lo: float, spacing: float, coefficients: Tensor) -> None:
        self.lo, self.spacing, self.coefficients = float(lo), float(spacing), coefficients
        self.hi = self.lo + self.spacing * coefficients.shape[0]
        self.fallbacks = 0  # z decoded by the network for lying outside [lo, hi]

    @property
    def points(self) -> int:
        return self.coefficients.shape[0] + 1

    @classmethod
    def build(cls, decoder: nn.Module, lo: float, hi: float, spacing: float = 1 / 32,
              max_points: int = 2**14) -> "DecoderTable | None":
        """A table of `decoder` over [lo, hi] that passes the check of the module doc, its spacing `spacing` or that
        halved as often as a failed check's error ratio asks (slope errors scale as h^3), or None when it would need
        more than `max_points` grid points."""
        exact, single = _curve(decoder, torch.float64), _curve(decoder, torch.float32)
        device = next(decoder.parameters()).device
        while math.ceil((hi - lo) / spacing) + 1 <= max_points:
            n = math.ceil((hi - lo) / spacing)
            grid = lo + spacing * torch.arange(n + 1, dtype=torch.float64, device=device)[:, None]
            y, m = exact(grid)
            table = cls(lo, spacing, cls._coefficients(y, m, spacing))
            probe = (grid + spacing * torch.tensor(CHECK_POINTS, dtype=torch.float64, device=device))[:-1]
            ratio = table._error_ratio(probe.reshape(-1, 1), exact, (y, m), single(grid))
            if ratio <= 1.0:
                return table
            spacing /= 2 ** max(1, math.ceil(math.log2(ratio) / 3)) if math.isfinite(ratio) else max_points
        return None

    @staticmethod
    def _coefficients(y: Tensor, m: Tensor, h: float) -> Tensor:
        """Per interval, c0..c3 of the cubic y0 + c1 t + c2 t^2 + c3 t^3 on t in [0, 1] with the end values and
        slopes, then its slope in z, (c1 + 2 c2 t + 3 c3 t^2) / h, as three more."""
        y0, y1, m0, m1 = y[:-1], y[1:], h * m[:-1], h * m[1:]
        c2, c3 = 3 * (y1 - y0) - 2 * m0 - m1, 2 * (y0 - y1) + m0 + m1
        return torch.stack([y0, m0, c2, c3, m0 / h, 2 * c2 / h, 3 * c3 / h], 1)

    def _error_ratio(self, probe: Tensor, exact: Callable, grid: tuple[Tensor, Tensor], single: tuple[Tensor, Tensor]) -> float:
        """The worst, over value and slope and every output, of PEAK_RATIO x the table's error at `probe` over the
        float32 decoder's largest error on the grid (`single` against the float64 `grid`; at least float32's epsilon
        times the curve's scale): the table is verified when it is <= 1."""
        worst = 0.0
        for table, truth, on_grid, network in zip(self.evaluate(probe), exact(probe), grid, single, strict=True):
            scale = max(1.0, float(on_grid.abs().max()))
            tolerance = max(float((network.double() - on_grid).abs().max()), FLOAT32_EPS * scale)
            ratio = PEAK_RATIO * float((table - truth).abs().max()) / tolerance
            worst = ratio if not ratio <= worst else worst  # NaN stays
        return worst if math.isfinite(worst) else math.inf

    def evaluate(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(value, slope) (N, P) in float64 at z (N, 1) in [lo, hi] (Horner's rule, fused multiply-adds)."""
        u = z.reshape(-1).double().sub(self.lo).div_(self.spacing)
        i = u.floor().clamp_(0, self.coefficients.shape[0] - 1)
        t = u.sub_(i).unsqueeze_(-1)
        c = self.coefficients.index_select(0, i.long()).unbind(1)  # 7 x (N, P), rows gathered whole
        value = torch.addcmul(c[0], t, torch.addcmul(c[1], t, torch.addcmul(c[2], t, c[3])))
        slope = torch.addcmul(c[4], t, torch.addcmul(c[5], t, c[6]))
        return value, slope

    def decode(self, model: GenerativeModel, z: Tensor) -> Tensor:
        """model.decode(z) for z (..., 1) through the table, differentiable in z; z outside [lo, hi] (or NaN)
        through the network."""
        flat = z.reshape(-1, 1)
        low, high = (float(v) for v in torch.aminmax(flat.detach()))  # the one host read
        if low >= self.lo and high <= self.hi:
            params = _Interpolate.apply(flat, self)
        else:
            rows = ~((flat >= self.lo) & (flat <= self.hi)).reshape(-1)
            self.fallbacks += int(rows.sum())
            params = _Interpolate.apply(torch.where(rows[:, None], self.lo, flat), self).clone()
            params[rows] = model.decoder(flat[rows])
        return params.reshape(*z.shape[:-1], params.shape[-1])

    def log_joint(self, model: GenerativeModel, x: Tensor) -> JointDensity:
        """z -> log p(x, z) of `model` (and its score) with the decoder read from this table."""
        return model.joint(x, partial(self.decode, model))

    @classmethod
    def around(cls, decoder: nn.Module, z: Tensor, margin: float = 1.0, **kwargs: float) -> "DecoderTable | None":
        """A table over the range of chain states z (..., 1) widened by `margin` each side (one host read); None for
        non-finite states (the network then meets them, and its caller's checks report them)."""
        lo, hi = (float(v) for v in torch.aminmax(z.detach()))
        if not math.isfinite(hi - lo):
            return None
        return cls.build(decoder, lo - margin, hi + margin, **kwargs)
