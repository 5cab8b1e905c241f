"""AVB's networks (Mescheder, Nowozin & Geiger 2017): implicit encoders and discriminators.

An implicit encoder takes noise as an *input*, z = z(x, eps), so q(z | x) is as flexible as the
network but has no density. The discriminator T(x, z) replaces the missing log-density: trained
by logistic regression to tell (x, z ~ q(z|x)) from (x, z ~ p(z)), its optimum is
T*(x, z) = log q(z|x) - log p(z) (Proposition 1 of the paper).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentlab.errors import ConfigError
from latentlab.nets import MLP, NetSpec, activation, build_encoder

ENCODER_KINDS = ("concat", "basis")
DISCRIMINATOR_KINDS = ("mlp", "inner_product", "residual")


def _coerce(cls: type, spec: Any) -> Any:
    """A spec dataclass from itself, a dict/DictConfig (Hydra) or None (defaults)."""
    if spec is None:
        return cls()
    if isinstance(spec, cls):
        return spec
    return cls(**{k: (list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v) for k, v in dict(spec).items()})


@dataclass
class ImplicitEncoderSpec:
    """How q(z | x, eps) is built.

    `concat`: the model's encoder net (MLP or conv, from `net`) applied to [x, eps], eps ~ N(0, I_noise_dim).
    `basis`: the paper's efficient adaptive-contrast form z = z0(x) + sum_i a_i(x) * v_i(eps_i) with
    `n_basis` noise-only networks v_i (hidden `basis_hidden`); its moments follow from those of the v_i.
    `min_moment_draws`: draws behind q's Monte Carlo moments (adaptive contrast), always independent of
    the z they normalise (moments of the same draws would make z~ a studentised residual, not N(0, I)):
    `basis`, noise draws per batch (at least the batch size); `concat`, extra encoder draws per x.
    `basis_offset`: a_i(x) = elu(h - offset) + 1; the official code's 5 starts q almost deterministic
    (a_i ~ e^-5), which suits its 2.5M small steps; smaller offsets start q wider and learn faster.
    """

    kind: str = "concat"
    noise_dim: int = 32
    n_basis: int = 16
    basis_hidden: Sequence[int] = field(default_factory=lambda: [128, 128, 128])
    basis_activation: str = "elu"
    min_moment_draws: int = 128
    basis_offset: float = 5.0

    def __post_init__(self) -> None:
        if self.kind not in ENCODER_KINDS:
            raise ConfigError(f"model.encoder.kind must be one of {ENCODER_KINDS}, got {self.kind!r}")
        self.basis_hidden = [int(h) for h in self.basis_hidden]
        for key, least in (("noise_dim", 1), ("n_basis", 1)):
            if int(getattr(self, key)) < least:
                raise ConfigError(f"model.encoder.{key} must be >= {least}, got {getattr(self, key)}")
        if int(self.min_moment_draws) < 2:
            raise ConfigError("model.encoder.min_moment_draws must be >= 2 (adaptive_contrast estimates q's variance "
                              f"from these draws), got {self.min_moment_draws}")
        if any(h <= 0 for h in self.basis_hidden):
            raise ConfigError(f"model.encoder.basis_hidden must be positive, got {self.basis_hidden}")
        activation(self.basis_activation)

    @classmethod
    def coerce(cls, spec: ImplicitEncoderSpec | Mapping[str, Any] | None) -> ImplicitEncoderSpec:
        return _coerce(cls, spec)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DiscriminatorSpec:
    """T(x, z): `mlp` on [x, z], the paper's `inner_product` form <f(x), g(z)> + T_x(x) + T_z(z), or the
    toy notebook's `residual` net on [x, z] (width `hidden_dims[0]`, `blocks` residual blocks).

    `prior_term` adds ||z||^2 / 2 = -log N(z; 0, I) + const, so the network only has to learn
    log q(z|x) (up to a constant) instead of the whole log-ratio, as in the official code.
    """

    kind: str = "mlp"
    hidden_dims: Sequence[int] = field(default_factory=lambda: [256, 256])
    activation: str = "leaky_relu"
    embed_dim: int = 256
    prior_term: bool = True
    blocks: int = 5

    def __post_init__(self) -> None:
        if self.kind not in DISCRIMINATOR_KINDS:
            raise ConfigError(f"model.discriminator.kind must be one of {DISCRIMINATOR_KINDS}, got {self.kind!r}")
        self.hidden_dims = [int(h) for h in self.hidden_dims]
        if any(h <= 0 for h in self.hidden_dims) or int(self.embed_dim) < 1 or int(self.blocks) < 1:
            raise ConfigError(f"model.discriminator.hidden_dims / embed_dim / blocks must be positive, got "
                              f"{self.hidden_dims}, {self.embed_dim}, {self.blocks}")
        if self.kind == "residual" and len(set(self.hidden_dims)) != 1:
            raise ConfigError("model.discriminator.kind=residual has one width: set model.discriminator.hidden_dims "
                              f"to a single width such as [256], got {self.hidden_dims}")
        activation(self.activation)

    @classmethod
    def coerce(cls, spec: DiscriminatorSpec | Mapping[str, Any] | None) -> DiscriminatorSpec:
        return _coerce(cls, spec)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------- encoders


class ImplicitDraw(NamedTuple):
    """Draws z (num_samples, batch, d) of q(z|x) and, when asked for, Monte Carlo moments mean / var
    (batch, d) of q(z|x) from draws independent of z (the caller decides whether to stop their gradients)."""

    z: Tensor
    mean: Tensor | None
    var: Tensor | None


class ConcatImplicitEncoder(nn.Module):
    """z = net(x, eps): the noise is just another input (MLP: concatenated; conv: joined at the MLP head).

    Its moments have no closed form: they are the sample mean and variance of `moment_draws` further
    draws per x, without gradients, taken `moment_chunk` rows at a time so memory stays bounded.
    """

    def __init__(self, net: NetSpec, data_dim: int, latent_dim: int, noise_dim: int,
                 image_shape: Sequence[int] | None = None, moment_draws: int = 128, moment_chunk: int = 65536) -> None:
        super().__init__()
        self.latent_dim, self.noise_dim = latent_dim, noise_dim
        self.moment_draws, self.moment_chunk = int(moment_draws), int(moment_chunk)
        self.net = build_encoder(net, data_dim, latent_dim, image_shape, extra_in=noise_dim)

    def sample(self, x: Tensor, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """(num_samples, batch, d) reparameterised draws."""
        s, b = num_samples, x.shape[0]
        eps = torch.randn(s * b, self.noise_dim, generator=generator, device=x.device, dtype=x.dtype)
        return self.net(x.repeat(s, *([1] * (x.dim() - 1))), eps).reshape(s, b, self.latent_dim)

    @torch.no_grad()
    def moments(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Mean and unbiased variance (batch, d) of `moment_draws` fresh draws per x, merged chunk by chunk
        (Chan et al.'s pairwise update, exact in any chunking)."""
        per_chunk = max(2, self.moment_chunk // max(1, x.shape[0]))
        count, mean, m2 = 0, None, None
        for start in range(0, self.moment_draws, per_chunk):
            z = self.sample(x, min(per_chunk, self.moment_draws - start), generator)
            n, z_mean = z.shape[0], z.mean(0)
            z_m2 = (z - z_mean).pow(2).sum(0)
            if mean is None:
                count, mean, m2 = n, z_mean, z_m2
                continue
            delta, total = z_mean - mean, count + n
            mean = mean + delta * (n / total)
            m2 = m2 + z_m2 + delta.pow(2) * (count * n / total)
            count = total
        return mean, m2 / (count - 1)

    def forward(self, x: Tensor, num_samples: int = 1, generator: torch.Generator | None = None,
                moments: bool = True) -> ImplicitDraw:
        z = self.sample(x, num_samples, generator)
        if not moments:
            return ImplicitDraw(z, None, None)
        return ImplicitDraw(z, *self.moments(x, generator))


class GroupedMLP(nn.Module):
    """`groups` independent MLPs of the same shape, evaluated in one batched matmul per layer.

    Input (groups, n, in_dim) -> (groups, n, out_dim); group i sees only its own slice, which is how
    the basis encoder runs its n_basis noise networks v_i without a Python loop.
    """

    def __init__(self, groups: int, in_dim: int, out_dim: int, hidden_dims: Sequence[int], act: str) -> None:
        super().__init__()
        dims = [in_dim, *hidden_dims, out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in itertools.pairwise(dims):
            bound = 1.0 / math.sqrt(a)  # nn.Linear's default initialisation, per group
            self.weights.append(nn.Parameter(torch.empty(groups, a, b).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(groups, 1, b).uniform_(-bound, bound)))
        self.act = activation(act)

    def forward(self, h: Tensor) -> Tensor:
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            if i < last:
                h = self.act(h)
        return h


class BasisImplicitEncoder(nn.Module):
    """The paper's encoder for adaptive contrast: z = z0(x) + sum_i a_i(x) * v_i(eps_i).

    Each v_i is a small network of noise only, so E[v_i] and Var[v_i] do not depend on x and can be
    estimated once per batch, from max(batch draws, `min_moment_draws`) noise draws of their own (not
    those that made z); with independent eps_i,
    E[z|x] = z0 + sum_i a_i E[v_i] and Var[z|x] = sum_i a_i^2 Var[v_i] (per dimension) cost nothing
    extra per example. a_i(x) = elu(. - offset) + 1 > 0 (offset 5 in the official code: q starts narrow).
    """

    def __init__(self, net: NetSpec, data_dim: int, latent_dim: int, spec: ImplicitEncoderSpec,
                 image_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        self.latent_dim, self.noise_dim, self.n_basis = latent_dim, spec.noise_dim, spec.n_basis
        self.min_moment_draws, self.basis_offset = spec.min_moment_draws, float(spec.basis_offset)
        self.trunk = build_encoder(net, data_dim, latent_dim * (1 + spec.n_basis), image_shape)
        self.basis = GroupedMLP(spec.n_basis, spec.noise_dim, latent_dim, spec.basis_hidden, spec.basis_activation)

    def coefficients(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """z0(x) (batch, d) and a(x) (batch, n_basis, d)."""
        out = self.trunk(x)
        z0, a = out[:, : self.latent_dim], out[:, self.latent_dim:]
        return z0, F.elu(a.reshape(-1, self.n_basis, self.latent_dim) - self.basis_offset) + 1.0

    def forward(self, x: Tensor, num_samples: int = 1, generator: torch.Generator | None = None,
                moments: bool = True) -> ImplicitDraw:
        s, b = num_samples, x.shape[0]
        z0, a = self.coefficients(x)
        n = s * b + (max(s * b, self.min_moment_draws) if moments else 0)
        eps = torch.randn(self.n_basis, n, self.noise_dim, generator=generator, device=x.device, dtype=x.dtype)
        v = self.basis(eps)  # (n_basis, n, d); the first s*b draws make z, the others (independent) the moments
        z = z0 + torch.einsum("bkd,ksbd->sbd", a, v[:, : s * b].reshape(self.n_basis, s, b, self.latent_dim))
        if not moments:
            return ImplicitDraw(z, None, None)
        v = v[:, s * b:]
        mean = z0 + torch.einsum("bkd,kd->bd", a, v.mean(1))
        var = torch.einsum("bkd,kd->bd", a.pow(2), v.var(1))
        return ImplicitDraw(z, mean, var)


def build_implicit_encoder(spec: ImplicitEncoderSpec, net: NetSpec, data_dim: int, latent_dim: int,
                           image_shape: Sequence[int] | None = None) -> nn.Module:
    if spec.kind == "basis":
        return BasisImplicitEncoder(net, data_dim, latent_dim, spec, image_shape)
    return ConcatImplicitEncoder(net, data_dim, latent_dim, spec.noise_dim, image_shape, spec.min_moment_draws)


# ----------------------------------------------------------------------------------- discriminators


def _half_sq_norm(z: Tensor) -> Tensor:
    return 0.5 * z.pow(2).sum(-1)


class MLPDiscriminator(nn.Module):
    """T(x, z) = MLP([x, z]) (+ ||z||^2 / 2); x (batch, D) broadcasts against z (..., batch, d) -> (..., batch)."""

    def __init__(self, data_dim: int, latent_dim: int, hidden_dims: Sequence[int] = (256, 256),
                 act: str = "leaky_relu", prior_term: bool = True) -> None:
        super().__init__()
        self.net = MLP(data_dim + latent_dim, 1, hidden_dims, act)
        self.prior_term = prior_term

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        t = self.net(x.expand(*z.shape[:-1], x.shape[-1]), z).squeeze(-1)
        return t + _half_sq_norm(z) if self.prior_term else t


class InnerProductDiscriminator(nn.Module):
    """T(x, z) = <f(x), g(z)> + T_x(x) + T_z(z) (+ ||z||^2 / 2), the official code's adversary.

    One x-network emits [f(x), T_x(x)] and one z-network emits [g(z), T_z(z)]: the x side runs once
    per example however many z are scored against it, which makes many-sample evaluation cheap.
    """

    def __init__(self, data_dim: int, latent_dim: int, hidden_dims: Sequence[int] = (256, 256),
                 act: str = "leaky_relu", embed_dim: int = 256, prior_term: bool = True) -> None:
        super().__init__()
        self.x_net = MLP(data_dim, embed_dim + 1, hidden_dims, act)
        self.z_net = MLP(latent_dim, embed_dim + 1, hidden_dims, act)
        self.prior_term = prior_term

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        fx, tx = self.x_net(x).split([self.x_net.out_dim - 1, 1], dim=-1)
        gz, tz = self.z_net(z).split([self.z_net.out_dim - 1, 1], dim=-1)
        t = (fx * gz).sum(-1) + tx.squeeze(-1) + tz.squeeze(-1)
        return t + _half_sq_norm(z) if self.prior_term else t


class ResidualDiscriminator(nn.Module):
    """The toy notebook's adversary: [x, z] -> width -> `blocks` x (h <- act(h + W2 relu(W1 h))) -> 1 (+ ||z||^2 / 2).

    W2 starts at zero (as in the notebook), so every block starts as the identity and depth costs nothing
    at initialisation; the inner ReLU is the notebook's too (TF-slim's default activation).
    """

    def __init__(self, data_dim: int, latent_dim: int, width: int = 256, blocks: int = 5, act: str = "elu",
                 prior_term: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(data_dim + latent_dim, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
                                    for _ in range(blocks))
        for block in self.blocks:
            nn.init.zeros_(block[-1].weight)
            nn.init.zeros_(block[-1].bias)
        self.act, self.out, self.prior_term = activation(act), nn.Linear(width, 1), prior_term

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        h = self.act(self.inp(torch.cat([x.expand(*z.shape[:-1], x.shape[-1]), z], dim=-1)))
        for block in self.blocks:
            h = self.act(h + block(h))
        t = self.out(h).squeeze(-1)
        return t + _half_sq_norm(z) if self.prior_term else t


def build_discriminator(spec: DiscriminatorSpec, data_dim: int, latent_dim: int) -> nn.Module:
    if spec.kind == "residual":
        return ResidualDiscriminator(data_dim, latent_dim, spec.hidden_dims[0], spec.blocks, spec.activation,
                                     spec.prior_term)
    if spec.kind == "inner_product":
        return InnerProductDiscriminator(data_dim, latent_dim, spec.hidden_dims, spec.activation, spec.embed_dim,
                                         spec.prior_term)
    return MLPDiscriminator(data_dim, latent_dim, spec.hidden_dims, spec.activation, spec.prior_term)


def discriminator_loss(t_q: Tensor, t_p: Tensor) -> Tensor:
    """Logistic loss of eq. (3.3), negated: -E_q log sigmoid(T) - E_p log(1 - sigmoid(T)).

    Its minimiser over all functions is T* = log q - log p; softplus keeps it stable for any |T|.
    """
    return F.softplus(-t_q).mean() + F.softplus(t_p).mean()


def discriminator_accuracy(t_q: Tensor, t_p: Tensor) -> Tensor:
    """Balanced accuracy of the rule 'z came from q iff T > 0' (0.5: T cannot tell them apart)."""
    return 0.5 * ((t_q > 0).float().mean() + (t_p <= 0).float().mean())


__all__ = [
    "BasisImplicitEncoder",
    "ConcatImplicitEncoder",
    "DiscriminatorSpec",
    "GroupedMLP",
    "ImplicitDraw",
    "ImplicitEncoderSpec",
    "InnerProductDiscriminator",
    "MLPDiscriminator",
    "ResidualDiscriminator",
    "build_discriminator",
    "build_implicit_encoder",
    "discriminator_accuracy",
    "discriminator_loss",
]
