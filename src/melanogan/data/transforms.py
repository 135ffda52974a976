"""Train and eval transform presets (torchvision v2), kept apart so evaluation cannot drift from
training: both start from the same cached uint8 image and end in the same normalisation."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Normalization = Literal["imagenet", "tanh", "none"]
Augment = Literal["none", "classic", "strong"]

# The augmentation presets' ranges, shared by `train_preset`'s per-image transforms and
# data/batch_augment.py's batch version, so the two cannot drift apart. strong adds a zoom-out (reflected
# border, RandomZoomOut), sharpening (RandomAdjustSharpness), blur (GaussianBlur 5x5) and the
# dermoscope's circular field of view (RandomMicroscope), each on a share p of the images.
PRESETS: dict[str, dict[str, tuple[float, float] | float]] = {
    "classic": {"area": (0.6, 1.0), "ratio": (0.85, 1.18), "brightness": (0.85, 1.15), "contrast": (0.85, 1.15),
                "saturation": (0.9, 1.1), "hue": (-0.02, 0.02)},
    "strong": {"area": (0.35, 1.0), "ratio": (0.75, 1.33), "brightness": (0.7, 1.3), "contrast": (0.7, 1.3),
               "saturation": (0.7, 1.3), "hue": (-0.03, 0.03), "zoom_p": 0.5, "zoom": (1.0, 1.6),
               "sharpen_p": 0.3, "sharpness": 2.0, "blur_p": 0.2, "sigma": (0.1, 1.5), "scope_p": 0.4,
               "radius": (0.5, 0.72), "shift": (-0.05, 0.05)},
}


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


class RandomZoomOut(torch.nn.Module):
    """Show the lesion smaller, as another clinic's dermoscope framing would: pad by reflection to up
    to `max_scale` times the side, then resize back (uint8 in, uint8 out)."""

    def __init__(self, p: float = 0.5, max_scale: float = 1.6):
        super().__init__()
        self.p, self.max_scale = p, max_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(torch.rand(())) >= self.p:
            return x
        h, w = x.shape[-2:]
        scale = 1 + float(torch.rand(())) * (self.max_scale - 1)
        pad_h, pad_w = min(h - 1, int(h * (scale - 1) / 2)), min(w - 1, int(w * (scale - 1) / 2))
        padded = torch.nn.functional.pad(x[None].float(), (pad_w, pad_w, pad_h, pad_h), mode="reflect")
        out = torch.nn.functional.interpolate(padded, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        return out[0].round_().clamp_(0, 255).to(x.dtype)


class RandomMicroscope(torch.nn.Module):
    """A dermoscope's circular field of view: black outside a circle of random radius (many archive
    images have it, many do not), so the model cannot use its presence as a clue."""

    def __init__(self, p: float = 0.4, radius: tuple[float, float] = (0.5, 0.72), shift: float = 0.05):
        super().__init__()
        self.p, self.radius, self.shift = p, radius, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(torch.rand(())) >= self.p:
            return x
        h, w = x.shape[-2:]
        side = min(h, w)
        r = (self.radius[0] + float(torch.rand(())) * (self.radius[1] - self.radius[0])) * side
        shift = (torch.rand(2) - 0.5) * 2 * self.shift  # the circle's centre moves up to `shift` of the side
        cy, cx = (h - 1) / 2 + float(shift[0]) * h, (w - 1) / 2 + float(shift[1]) * w
        yy = torch.arange(h, dtype=torch.float32)[:, None] - cy
        xx = torch.arange(w, dtype=torch.float32)[None, :] - cx
        mask = ((r - torch.sqrt(yy**2 + xx**2)) / (0.02 * side) + 0.5).clamp_(0, 1)  # a soft edge
        return (x.float() * mask).round_().to(x.dtype)


def bicubic_upsample(image_hwc: np.ndarray, size: int) -> Image.Image:
    """How `generate` brings generator output (uint8 HxWx3) to the cache size: Pillow's bicubic."""
    pil = Image.fromarray(image_hwc)
    return pil if pil.size == (size, size) else pil.resize((size, size), Image.Resampling.BICUBIC)


class GeneratorResolution(torch.nn.Module):
    """The path every synthetic image took, applied to a real uint8 (C, H, W) image: down to the
    generator's resolution as the GAN sees real images (antialiased, rounded to uint8 like generator
    output), then back up with `bicubic_upsample`. Real and synthetic training images then share
    their softness, so a classifier cannot learn "soft, upsampled texture means melanoma"."""

    def __init__(self, resolution: int):
        super().__init__()
        self.resolution = int(resolution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.resolution >= min(h, w):
            return x
        small = v2.functional.resize(x, [self.resolution, self.resolution], antialias=True)
        up = bicubic_upsample(small.permute(1, 2, 0).numpy(), h)
        return torch.from_numpy(np.asarray(up).copy()).permute(2, 0, 1)


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
    `strong`: for models meant to work on other clinics' images: zoom in and out, strong colour,
    contrast and sharpness changes (dermatoscopes and cameras differ mostly there), occasional blur,
    a dermoscope's circular field of view."""
    if augment == "none":
        return eval_preset(image_size, normalization)
    if augment == "classic":
        r = PRESETS["classic"]
        return v2.Compose([
            v2.RandomResizedCrop(image_size, scale=r["area"], ratio=r["ratio"], antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomRotation(180),
            v2.ColorJitter(brightness=r["brightness"], contrast=r["contrast"], saturation=r["saturation"],
                           hue=r["hue"]),
            _to_float(normalization),
        ])
    if augment == "strong":
        r = PRESETS["strong"]
        return v2.Compose([
            v2.RandomResizedCrop(image_size, scale=r["area"], ratio=r["ratio"], antialias=True),
            RandomZoomOut(p=r["zoom_p"], max_scale=r["zoom"][1]),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomRotation(180),
            v2.ColorJitter(brightness=r["brightness"], contrast=r["contrast"], saturation=r["saturation"],
                           hue=r["hue"]),
            v2.RandomAdjustSharpness(r["sharpness"], p=r["sharpen_p"]),
            v2.RandomApply([v2.GaussianBlur(5, sigma=r["sigma"])], p=r["blur_p"]),
            RandomMicroscope(p=r["scope_p"], radius=r["radius"], shift=r["shift"][1]),
            _to_float(normalization),
        ])
    raise ValueError(f"unknown augment {augment!r}; use 'none', 'classic' or 'strong'")
