"""A plain MLP: Linear -> activation, repeated, then a linear read-out."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from latentlab.errors import ConfigError

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


def activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(f"net.activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}") from None


class MLP(nn.Sequential):
    """in_dim -> hidden_dims[0] -> ... -> out_dim; several inputs are concatenated on the last dim."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dims: Sequence[int] = (256, 256), act: str = "relu") -> None:
        dims = [in_dim, *hidden_dims]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), activation(act)]
        layers.append(nn.Linear(dims[-1], out_dim))
        super().__init__(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, *inputs: Tensor) -> Tensor:  # type: ignore[override]
        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=-1)
        return super().forward(x)
