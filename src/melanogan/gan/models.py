"""Conditional generator and critic, with a registry (`create_generator`, `create_critic`).

The critic has no BatchNorm or Dropout: the WGAN-GP penalty constrains the gradient of the critic
with respect to each input sample, which is only meaningful if a sample's score does not depend on
the other samples of the batch. Per-sample LayerNorm (GroupNorm with one group) or none is allowed.
Conditioning: the generator concatenates a learned class embedding to the noise; the critic uses a
projection head (Miyato & Koyama 2018): score = w.h + <embed(y), h>.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from melanogan.errors import MelanoganError

RESOLUTIONS = (32, 64, 128, 256)


def _check_resolution(resolution: int) -> int:
    if resolution not in RESOLUTIONS:
        supported = ", ".join(map(str, RESOLUTIONS))
        raise MelanoganError(f"resolution {resolution} is not supported; use one of {supported}.")
    return int(math.log2(resolution // 4))  # number of 2x stages between 4x4 and the output


class DCGANGenerator(nn.Module):
    """Noise + class embedding -> Linear -> 4x4 -> transposed-conv stages (x2 each) -> tanh image.

    `channels[i]` is the width after stage i; the original study's 128px model is
    channels (1024,) 512, 256, 128, 64 with 5x5 kernels."""

    def __init__(self, resolution: int = 64, noise_dim: int = 128, num_classes: int = 2, base_channels: int = 512,
                 kernel_size: int = 4, embed_dim: int | None = None, norm: str = "batch") -> None:
        super().__init__()
        stages = _check_resolution(resolution)
        if norm not in ("batch", "none"):
            raise MelanoganError(f"generator norm {norm!r} is unknown; use 'batch' or 'none'.")

        def norm_layer(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "batch" else nn.Identity()

        self.resolution, self.noise_dim, self.num_classes = resolution, noise_dim, num_classes
        embed_dim = embed_dim or noise_dim
        self.embed = nn.Embedding(num_classes, embed_dim)
        widths = [max(16, base_channels // 2**i) for i in range(stages)]
        self.fc = nn.Linear(noise_dim + embed_dim, 4 * 4 * widths[0], bias=False)
        self.fc_norm = norm_layer(widths[0])
        pad = (kernel_size - 1) // 2
        out_pad = 1 if kernel_size % 2 == 1 else 0  # 5x5 stride 2 needs output_padding 1 to double exactly
        layers: list[nn.Module] = []
        for i in range(stages - 1):
            layers += [nn.ConvTranspose2d(widths[i], widths[i + 1], kernel_size, 2, pad, out_pad, bias=False),
                       norm_layer(widths[i + 1]), nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(widths[-1], 3, kernel_size, 2, pad, out_pad), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        self.widths = widths

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.embed(labels)], dim=1)).view(z.shape[0], self.widths[0], 4, 4)
        return self.body(torch.relu(self.fc_norm(h)))


class DCGANCritic(nn.Module):
    """Strided convolutions with LeakyReLU(0.2) down to 4x4, then a linear score plus projection."""

    def __init__(self, resolution: int = 64, num_classes: int = 2, base_channels: int = 64, kernel_size: int = 4,
                 norm: str = "none", max_channels: int = 1024) -> None:
        super().__init__()
        stages = _check_resolution(resolution)
        if norm not in ("none", "layer"):
            raise MelanoganError(f"critic norm {norm!r} is not allowed; use 'none' or 'layer' (never batch norm: "
                                 "it couples the samples the gradient penalty treats separately).")
        self.resolution, self.num_classes = resolution, num_classes
        pad = (kernel_size - 1) // 2
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(stages):
            c_out = min(max_channels, base_channels * 2**i)
            layers.append(nn.Conv2d(c_in, c_out, kernel_size, 2, pad))
            if norm == "layer" and i > 0:
                layers.append(nn.GroupNorm(1, c_out))  # one group = LayerNorm over (C, H, W) of one sample
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.features = c_in * 4 * 4
        self.linear = nn.Linear(self.features, 1)
        self.embed = nn.Embedding(num_classes, self.features)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.body(x).flatten(1)
        return self.linear(h).squeeze(1) + (self.embed(labels) * h).sum(dim=1)


_GENERATORS: dict[str, Callable[..., nn.Module]] = {"dcgan": DCGANGenerator}
_CRITICS: dict[str, Callable[..., nn.Module]] = {"dcgan": DCGANCritic}


def list_architectures() -> list[str]:
    return sorted(_GENERATORS)


def create_generator(name: str, **kwargs) -> nn.Module:
    """Build a registered generator by name (e.g. `create_generator("dcgan", resolution=64)`)."""
    if name not in _GENERATORS:
        raise MelanoganError(f"unknown generator {name!r}; registered: {', '.join(sorted(_GENERATORS))}.")
    return _GENERATORS[name](**kwargs)


def create_critic(name: str, **kwargs) -> nn.Module:
    """Build a registered critic by name."""
    if name not in _CRITICS:
        raise MelanoganError(f"unknown critic {name!r}; registered: {', '.join(sorted(_CRITICS))}.")
    return _CRITICS[name](**kwargs)
