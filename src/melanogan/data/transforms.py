"""Train and eval transform presets (torchvision v2), kept apart so evaluation cannot drift from
training: both start from the same cached uint8 image and end in the same normalisation."""

from __future__ import annotations

from typing import Literal

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Normalization = Literal["imagenet", "tanh", "none"]
Augment = Literal["none", "classic"]


def _normalize(normalization: Normalization) -> list:
    if normalization == "imagenet":
        return [v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if normalization == "tanh":  # [-1, 1], the range of a tanh generator
        return [v2.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    return []


def eval_preset(image_size: int, normalization: Normalization = "imagenet") -> v2.Compose:
    """Resize the cached square image to `image_size`, scale to float, normalise."""
    return v2.Compose([v2.Resize(image_size, antialias=True), v2.ToDtype(torch.float32, scale=True),
                       *_normalize(normalization)])


def train_preset(image_size: int, augment: Augment = "none", normalization: Normalization = "imagenet") -> v2.Compose:
    """`none`: exactly the eval preset. `classic`: the augmentations dermoscopy models use (lesions
    have no canonical orientation): flips, 0-180 degree rotations, scale/crop, mild colour jitter."""
    if augment == "none":
        return eval_preset(image_size, normalization)
    if augment != "classic":
        raise ValueError(f"unknown augment {augment!r}; use 'none' or 'classic'")
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.6, 1.0), ratio=(0.85, 1.18), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomRotation(180),
        v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.1, hue=0.02),
        v2.ToDtype(torch.float32, scale=True),
        *_normalize(normalization),
    ])
