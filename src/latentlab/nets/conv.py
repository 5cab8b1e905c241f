"""Small conv encoder/decoder for 28x28 images (the AVB / ALMOND MNIST settings use nets of this size)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from latentlab.nets.mlp import MLP, activation


class ConvEncoder(nn.Module):
    """(batch, C*28*28) -> conv stride-2 stack (28->14->7) -> MLP head; optional extra input (noise) joins at the head."""

    def __init__(self, image_shape: Sequence[int], out_dim: int, channels: Sequence[int] = (32, 64),
                 hidden_dims: Sequence[int] = (256,), act: str = "relu", extra_in: int = 0) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        c_in, layers, size = image_shape[0], [], image_shape[1]
        for c in channels:
            layers += [nn.Conv2d(c_in, c, kernel_size=4, stride=2, padding=1), activation(act)]
            c_in, size = c, size // 2
        self.conv = nn.Sequential(*layers, nn.Flatten())
        self.head = MLP(c_in * size * size + extra_in, out_dim, hidden_dims, act)

    def forward(self, x: Tensor, *extra: Tensor) -> Tensor:
        h = self.conv(x.reshape(-1, *self.image_shape))
        return self.head(torch.cat([h, *extra], dim=-1) if extra else h)


class ConvDecoder(nn.Module):
    """(batch, latent_dim) -> MLP -> (C, 7, 7) -> transposed convs (7->14->28) -> (batch, mult*C*28*28)."""

    def __init__(self, latent_dim: int, image_shape: Sequence[int], param_multiplier: int = 1,
                 channels: Sequence[int] = (32, 64), hidden_dims: Sequence[int] = (256,), act: str = "relu") -> None:
        super().__init__()
        channels = list(channels)
        c_out = image_shape[0] * param_multiplier
        self.base = (channels[-1], image_shape[1] // 2 ** len(channels), image_shape[2] // 2 ** len(channels))
        self.fc = nn.Sequential(MLP(latent_dim, self.base[0] * self.base[1] * self.base[2], hidden_dims, act), activation(act))
        layers: list[nn.Module] = []
        rev = list(reversed(channels))
        for i, c in enumerate(rev):
            nxt = rev[i + 1] if i + 1 < len(rev) else c_out
            layers.append(nn.ConvTranspose2d(c, nxt, kernel_size=4, stride=2, padding=1))
            if i + 1 < len(rev):
                layers.append(activation(act))
        self.deconv = nn.Sequential(*layers, nn.Flatten())

    def forward(self, z: Tensor) -> Tensor:
        return self.deconv(self.fc(z).reshape(-1, *self.base))
