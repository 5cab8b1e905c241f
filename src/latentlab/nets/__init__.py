"""Networks: MLPs and small conv nets for 28x28 images, built from one `NetSpec`.

Models take a `NetSpec` (plain, typed, serialisable) rather than nn.Modules, so the same
constructor works from Hydra, from LightningCLI and from a checkpoint's saved hyperparameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from torch import nn

from latentlab.errors import ConfigError
from latentlab.nets.conv import ConvDecoder, ConvEncoder
from latentlab.nets.mlp import MLP, activation

NET_KINDS = ("mlp", "conv")


@dataclass
class NetSpec:
    """Architecture of encoders/decoders/discriminators: `kind` mlp|conv, hidden widths, activation."""

    kind: str = "mlp"
    hidden_dims: Sequence[int] = field(default_factory=lambda: [256, 256])
    activation: str = "relu"
    channels: Sequence[int] = field(default_factory=lambda: [32, 64])

    def __post_init__(self) -> None:
        if self.kind not in NET_KINDS:
            raise ConfigError(f"net.kind must be one of {NET_KINDS}, got {self.kind!r}")
        self.hidden_dims = [int(h) for h in self.hidden_dims]
        self.channels = [int(c) for c in self.channels]
        if any(h <= 0 for h in self.hidden_dims) or any(c <= 0 for c in self.channels):
            raise ConfigError(f"net.hidden_dims and net.channels must be positive, got {self.hidden_dims}, {self.channels}")
        activation(self.activation)  # validates the name

    @classmethod
    def coerce(cls, spec: "NetSpec | Mapping[str, Any] | None") -> "NetSpec":
        """Accept a NetSpec, a dict/DictConfig (Hydra), or None (defaults)."""
        if spec is None:
            return cls()
        if isinstance(spec, cls):
            return spec
        return cls(**{k: (list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v) for k, v in dict(spec).items()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_conv(spec: NetSpec, image_shape: Sequence[int] | None) -> tuple[int, int, int]:
    if image_shape is None or len(image_shape) != 3 or tuple(image_shape)[1:] != (28, 28):
        raise ConfigError(f"net=conv needs 28x28 images (data with image_shape (C, 28, 28)), got image_shape={image_shape}; "
                          "use net=mlp for this dataset")
    return tuple(int(s) for s in image_shape)  # type: ignore[return-value]


def build_encoder(spec: NetSpec, in_dim: int, out_dim: int, image_shape: Sequence[int] | None = None,
                  extra_in: int = 0) -> nn.Module:
    """x (batch, in_dim) [+ extra (batch, extra_in), e.g. AVB's noise] -> (batch, out_dim)."""
    if spec.kind == "conv":
        return ConvEncoder(_check_conv(spec, image_shape), out_dim, spec.channels, spec.hidden_dims, spec.activation, extra_in)
    return MLP(in_dim + extra_in, out_dim, spec.hidden_dims, spec.activation)


def build_decoder(spec: NetSpec, latent_dim: int, out_dim: int, image_shape: Sequence[int] | None = None) -> nn.Module:
    """z (batch, latent_dim) -> likelihood parameters (batch, out_dim)."""
    if spec.kind == "conv":
        shape = _check_conv(spec, image_shape)
        return ConvDecoder(latent_dim, shape, out_dim // (shape[0] * 28 * 28), spec.channels, spec.hidden_dims, spec.activation)
    return MLP(latent_dim, out_dim, list(reversed(spec.hidden_dims)), spec.activation)


__all__ = ["MLP", "ConvEncoder", "ConvDecoder", "NetSpec", "build_encoder", "build_decoder", "activation"]
