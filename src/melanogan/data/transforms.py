"""Train and eval transform presets (torchvision v2), kept apart so evaluation cannot drift from
training: both start from the same cached uint8 image and end in the same normalisation."""

from __future__ import annotations

from typing import Literal

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Normalization = Literal["imagenet", "tanh", "none"]
Augment = Literal["none", "classic", "strong"]


class ToNormalizedFloat(torch.nn.Module):
    """uint8 (C, H, W) -> float32 (x / 255 - mean) / std in one conversion and two in-place passes
    (ToDtype + Normalize would make four passes over the image)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 image tensor, got {x.dtype}")
        return x.to(torch.float32).mul_(self.scale).sub_(self.shift)


def _to_float(normalization: Normalization) -> torch.nn.Module:
    if normalization == "imagenet":
        return ToNormalizedFloat(IMAGENET_MEAN, IMAGENET_STD)
    if normalization == "tanh":  # [-1, 1], the range of a tanh generator
        return ToNormalizedFloat((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    if normalization == "none":
        return ToNormalizedFloat((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    raise ValueError(f"unknown normalization {normalization!r}")


def eval_preset(image_size: int, normalization: Normalization = "imagenet") -> v2.Compose:
    """Resize the cached square image to `image_size`, scale to float, normalise."""
    return v2.Compose([v2.Resize(image_size, antialias=True), _to_float(normalization)])


def train_preset(image_size: int, augment: Augment = "none", normalization: Normalization = "imagenet") -> v2.Compose:
    """`none`: exactly the eval preset. `classic`: the augmentations dermoscopy models use (lesions
    have no canonical orientation): flips, 0-180 degree rotations, scale/crop, mild colour jitter.
    `strong`: for models meant to work on other clinics' images: wider scale range, strong colour,
    contrast and sharpness changes (dermatoscopes and cameras differ mostly there), occasional blur."""
    if augment == "none":
        return eval_preset(image_size, normalization)
    if augment == "classic":
        return v2.Compose([
            v2.RandomResizedCrop(image_size, scale=(0.6, 1.0), ratio=(0.85, 1.18), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomRotation(180),
            v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.1, hue=0.02),
            _to_float(normalization),
        ])
    if augment == "strong":
        return v2.Compose([
            v2.RandomResizedCrop(image_size, scale=(0.35, 1.0), ratio=(0.75, 1.33), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomRotation(180),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.06),
            v2.RandomAdjustSharpness(2.0, p=0.3),
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.2),
            _to_float(normalization),
        ])
    raise ValueError(f"unknown augment {augment!r}; use 'none', 'classic' or 'strong'")
