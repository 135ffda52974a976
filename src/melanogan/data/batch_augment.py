"""Classic augmentation applied to a whole uint8 batch in the training process, as a few tensor
operations: one affine resampling (crop scale and aspect, flips, rotation, resize to the model's
input) and one colour transform per image, then normalisation.

Why: per-image torchvision transforms in a DataLoader worker cost 40% of a CPU training budget
(measured: 316 -> 190 img/s for small-cnn at 128 px on 2 cores), and a fixed budget buys epochs.
The distribution follows `train_preset(..., "classic")`: crop area 0.6-1 of the image with aspect
0.85-1.18, horizontal and vertical flips with probability 1/2, a rotation uniform in +-180 degrees
(black corners), brightness and contrast factors in 0.85-1.15, saturation in 0.9-1.1, hue shifted by
up to 0.02 of a turn. Differences: one bilinear resampling instead of a resize followed by a
rotation (slightly sharper), and the crop is placed so that it stays inside the image before the
rotation, as RandomResizedCrop places it.

`color="lab"` swaps the colour step for one in CIELAB, a perceptual space (a lever of README's
"Models that travel"): lightness contrast and offset, a chroma scale, and an offset of a* and b*,
i.e. a shift of the white point, which is how dermoscopes' illuminants and sensors differ.

`aspect=A` draws the crop's aspect ratio log-uniformly in [1/A, A] instead of the preset's range
(classic 0.85-1.18, strong 0.75-1.33): a crop of aspect r resized to the square input makes a lesion
1/r as wide for its height. Why a lever: two of our three sources reach the cache as copies squashed
from 4:3 to a square (lesions 0.75 as wide; README "Sources"), the third cropped, so a model trained
on one geometry meets the other at a held-out source; A = 4/3 covers that squash in either
direction (with the rotation), and is RandomResizedCrop's own default range.

`illumination="random"` multiplies each image by a smooth illumination field after the geometry and
before the colour step (light reaches the skin before the sensor sees it): a lens vignette (darker
towards a randomly shifted centre's periphery) times a linear gradient in a random direction (a ring
light that is brighter on one side), another lever of "Models that travel" (`illumination_field`).

`grayscale=P` replaces each image, with probability P, by its luminance in all three channels (the
ITU-R 601-2 weights, as torchvision's RandomGrayscale) after the colour step: a model that must find
melanoma without colour on part of its batches leans less on the hues and casts that differ between
dermoscopes and clinics, and more on structure (another lever of "Models that travel"; weight-free).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from melanogan.data.transforms import IMAGENET_MEAN, IMAGENET_STD, PRESETS

# The luminance weights torchvision's rgb_to_grayscale uses (ITU-R 601-2).
_GREY = (0.2989, 0.587, 0.114)


# sRGB (D65) -> XYZ, and the D65 white point: the standard CIELAB definition (as OpenCV's RGB2Lab).
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE = (0.950456, 1.0, 1.088754)
_DELTA = 6 / 29


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], (B, 3, H, W) -> CIELAB (L* in [0, 100], a* and b* around 0), D65."""
    linear = torch.where(x <= 0.04045, x / 12.92, ((x.clamp(min=0) + 0.055) / 1.055) ** 2.4)
    m = torch.tensor(_RGB_TO_XYZ, dtype=x.dtype, device=x.device)
    white = torch.tensor(_WHITE, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,bjhw->bihw", m, linear) / white
    f = torch.where(xyz > _DELTA ** 3, xyz.clamp(min=1e-12) ** (1 / 3), xyz / (3 * _DELTA ** 2) + 4 / 29)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """The inverse of `rgb_to_lab`, clamped to [0, 1] (colours outside the sRGB gamut are clipped)."""
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], dim=1)
    xyz = torch.where(f > _DELTA, f ** 3, 3 * _DELTA ** 2 * (f - 4 / 29))
    xyz = xyz * torch.tensor(_WHITE, dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    m = torch.linalg.inv(torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)).to(lab.dtype).to(lab.device)
    linear = torch.einsum("ij,bjhw->bihw", m, xyz).clamp(0, 1)
    srgb = torch.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear.clamp(min=1e-12) ** (1 / 2.4) - 0.055)
    return srgb.clamp(0, 1)


def _hue_matrices(shift: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) RGB matrices rotating hue by `shift` turns around the grey axis (YIQ rotation)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    from_yiq = torch.linalg.inv(to_yiq)
    angle = shift * 2 * math.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(len(shift), 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    return from_yiq @ rot @ to_yiq


def reflect_unit(q: torch.Tensor) -> torch.Tensor:
    """Coordinates folded into [-1, 1] by reflection at the edges (a mirrored border, any distance)."""
    t = torch.remainder(q + 1, 4)
    return torch.where(t <= 2, t, 4 - t) - 1


def sharpen(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_sharpness per image: factor * x + (1 - factor) * smoothed, the smoothing
    kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 on the interior (border pixels are their own smoothed
    value), clamped to [0, 1]. Only the images with factor != 1 are computed."""
    todo = torch.nonzero(factor != 1).flatten()
    if not len(todo):
        return x
    sub = x[todo]
    # the 3x3 sum by an average pool (a 1-channel conv2d is ~15x slower on a CPU) plus 4 x the centre
    smooth = (F.avg_pool2d(sub, 3, stride=1) * 9 + 4 * sub[..., 1:-1, 1:-1]) / 13
    degenerate = sub.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    f = factor[todo].to(x.dtype).view(-1, 1, 1, 1)
    out = x.clone()
    out[todo] = (f * sub + (1 - f) * degenerate).clamp(0, 1)
    return out


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int = 5) -> torch.Tensor:
    """torchvision's gaussian_blur per image (separable, reflect padding); sigma 0 leaves an image as it
    is (and is not computed)."""
    todo = torch.nonzero(sigma > 0).flatten()
    if not len(todo):
        return x
    sub = x[todo]
    b, c, h, w = sub.shape
    offsets = torch.arange(kernel, dtype=x.dtype, device=x.device) - (kernel - 1) / 2
    g = torch.exp(-0.5 * (offsets / sigma[todo].to(x.device, x.dtype).view(-1, 1)) ** 2)
    g = (g / g.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (b * c, k)
    pad = kernel // 2
    y = F.pad(sub.reshape(1, b * c, h, w), [pad, pad, pad, pad], mode="reflect")
    y = F.conv2d(y, g.view(b * c, 1, 1, kernel), groups=b * c)
    y = F.conv2d(y, g.view(b * c, 1, kernel, 1), groups=b * c)
    out = x.clone()
    out[todo] = y.view(b, c, h, w)
    return out


def microscope_mask(n: int, size: int, radius: torch.Tensor, shift_y: torch.Tensor, shift_x: torch.Tensor,
                    device=None) -> torch.Tensor:
    """RandomMicroscope's soft circular field of view per image: (B, 1, size, size) in [0, 1]; `radius`
    a fraction of the side (0 or less: no circle, all ones), the centre moved by shift * side."""
    centre = (size - 1) / 2
    cy = (centre + shift_y * size).view(-1, 1, 1)
    cx = (centre + shift_x * size).view(-1, 1, 1)
    yy = torch.arange(size, dtype=torch.float32, device=device).view(1, -1, 1) - cy.to(device)
    xx = torch.arange(size, dtype=torch.float32, device=device).view(1, 1, -1) - cx.to(device)
    r = (radius * size).view(-1, 1, 1).to(device)
    mask = ((r - torch.sqrt(yy**2 + xx**2)) / (0.02 * size) + 0.5).clamp(0, 1)
    return torch.where(r > 0, mask, torch.ones_like(mask)).view(n, 1, size, size)


def pixel_centres(size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The `size` pixel centres of a side in [-1, 1] coordinates (grid_sample's align_corners=False)."""
    return (torch.arange(size, device=device, dtype=dtype) * 2 + 1) / size - 1


def illumination_field(size: int, vignette: torch.Tensor, centre_y: torch.Tensor, centre_x: torch.Tensor,
                       gradient: torch.Tensor, angle: torch.Tensor, device=None) -> torch.Tensor:
    """(B, 1, size, size) multiplicative gain of a dermoscope's uneven illumination, per image.

    With pixel centres at (u, v) in [-1, 1]^2 (u to the right, v down):
    vignette: 1 - vignette * r^2, r^2 = ((u - centre_x)^2 + (v - centre_y)^2) / 2 (1 at a corner of a
    centred field), clamped at 0; gradient: 1 + gradient * (cos(angle) u + sin(angle) v) / sqrt(2)
    (1 +- gradient at the corners along `angle`). Their product. vignette = gradient = 0: all ones."""
    coords = pixel_centres(size, device)
    u, v = coords.view(1, 1, -1), coords.view(1, -1, 1)

    def per_image(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=torch.float32).view(-1, 1, 1)

    r2 = ((u - per_image(centre_x)) ** 2 + (v - per_image(centre_y)) ** 2) / 2
    lens = (1 - per_image(vignette) * r2).clamp(min=0)
    a = per_image(angle)
    ring = 1 + per_image(gradient) * (torch.cos(a) * u + torch.sin(a) * v) / math.sqrt(2)
    return (lens * ring).unsqueeze(1)


class BatchAugment(torch.nn.Module):
    """uint8 (B, 3, S, S) -> normalised float (B, 3, size, size), augmented when `augment` is
    `classic` or `strong` (or resized only, `none`), classic's colours changed in RGB (`color="rgb"`,
    torchvision's ColorJitter) or in CIELAB (`"lab"`), optionally under a random illumination field
    (`illumination="random"`). Draws from `generator` so that runs repeat bitwise on CPU."""

    # Lab ranges: L* contrast about mid-grey as the RGB contrast (0.85-1.15); L* offset +-8 (about the
    # RGB brightness range at skin's L* ~ 55-65); chroma x0.8-1.2; white-point shift +-6 in a* and b*
    # (a just-noticeable difference is ~2: a visible cast, as from another illuminant or sensor).
    LAB_RANGES: ClassVar[dict[str, tuple[float, float]]] = {
        "lab_contrast": (0.85, 1.15), "lab_offset": (-8.0, 8.0), "chroma": (0.8, 1.2), "da": (-6.0, 6.0),
        "db": (-6.0, 6.0)}
    # Illumination ranges: a vignette darkening a centred field's corners by up to 50% (dermoscope
    # photographs range from evenly lit to dark-cornered), its centre off by up to 0.2 of the half-side,
    # and a side-to-side gradient of up to +-30% at the corners (one side of a ring light nearer).
    # Uniform from 0, so some images are lit almost evenly.
    ILLUMINATION_RANGES: ClassVar[dict[str, tuple[float, float]]] = {
        "vignette": (0.0, 0.5), "light_y": (-0.2, 0.2), "light_x": (-0.2, 0.2), "gradient": (0.0, 0.3),
        "light_angle": (-math.pi, math.pi)}

    def __init__(self, size: int, augment: str = "classic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 color: str = "rgb", illumination: str = "none", aspect: float | None = None,
                 grayscale: float = 0.0):
        super().__init__()
        if augment not in ("none", "classic", "strong"):
            raise ValueError(f"batch augmentation supports 'none', 'classic' and 'strong', not {augment!r}")
        if color not in ("rgb", "lab"):
            raise ValueError(f"colour augmentation is 'rgb' or 'lab', not {color!r}")
        if color == "lab" and augment != "classic":
            raise ValueError("'lab' colour augmentation is the colour step of the classic preset")
        if illumination not in ("none", "random"):
            raise ValueError(f"illumination augmentation is 'none' or 'random', not {illumination!r}")
        if aspect is not None and not (math.isfinite(aspect) and 1.0 <= aspect <= 2.0):
            raise ValueError(f"the crop aspect range is [1/A, A] with A in [1, 2], not A = {aspect!r}")
        if not (math.isfinite(grayscale) and 0.0 <= grayscale <= 1.0):
            raise ValueError(f"grayscale is the share of images made grey, a probability in [0, 1], not {grayscale!r}")
        # steps of the augmenting presets: 'none' only resizes, so it would silently drop them
        steps = [name for name, on in (("illumination augmentation", illumination != "none"),
                                       ("a crop aspect range", aspect is not None),
                                       ("random greyscale", grayscale > 0)) if on]
        if steps and augment == "none":
            raise ValueError(f"{' and '.join(steps)}: a step of the 'classic' and 'strong' presets, not of 'none'")
        self.size, self.augment, self.color, self.illumination = size, augment, color, illumination
        self.aspect, self.grayscale = aspect, grayscale
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-image parameters, in the units of `train_preset`'s transforms (classic's draws come
        first and in the same order for every preset and colour space)."""
        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=generator)

        r = PRESETS["strong" if self.augment == "strong" else "classic"]
        area = uniform(*r["area"])
        lo, hi = (1 / self.aspect, self.aspect) if self.aspect is not None else r["ratio"]
        log_ratio = uniform(math.log(lo), math.log(hi))
        ratio = torch.exp(log_ratio)
        # crop side lengths as fractions of the image (clamped to fit, as RandomResizedCrop retries)
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        p = {"w": w, "h": h, "cx": uniform(-1, 1) * (1 - w), "cy": uniform(-1, 1) * (1 - h),
             "flip_x": torch.rand(n, generator=generator) < 0.5, "flip_y": torch.rand(n, generator=generator) < 0.5,
             "angle": uniform(-math.pi, math.pi), "brightness": uniform(*r["brightness"]),
             "contrast": uniform(*r["contrast"]), "saturation": uniform(*r["saturation"]), "hue": uniform(*r["hue"])}
        if self.color == "lab":  # drawn after the RGB ones, so geometry draws stay those of "rgb"
            p.update({k: uniform(lo, hi) for k, (lo, hi) in self.LAB_RANGES.items()})
        if self.augment == "strong":  # each extra transform on its share of the images; 1 / 0 = not applied
            def chance(share: float) -> torch.Tensor:
                return torch.rand(n, generator=generator) < share

            p["zoom"] = torch.where(chance(r["zoom_p"]), uniform(*r["zoom"]), 1.0)
            p["sharpness"] = torch.where(chance(r["sharpen_p"]), r["sharpness"], 1.0)
            p["sigma"] = torch.where(chance(r["blur_p"]), uniform(*r["sigma"]), 0.0)
            p["radius"] = torch.where(chance(r["scope_p"]), uniform(*r["radius"]), 0.0)
            p["shift_y"], p["shift_x"] = uniform(*r["shift"]), uniform(*r["shift"])
        if self.illumination == "random":  # drawn last, so every other draw stays what it was without it
            p.update({k: uniform(lo, hi) for k, (lo, hi) in self.ILLUMINATION_RANGES.items()})
        if self.grayscale > 0:  # after illumination's, so the draws without greyscale stay what they were
            p["grey"] = torch.rand(n, generator=generator) < self.grayscale
        return p

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise TypeError(f"expected a uint8 (B, 3, H, W) batch, got {x.dtype} {tuple(x.shape)}")
        x = x.float().div_(255)
        if self.augment == "none":
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        else:  # parameters drawn on the CPU (repeatable with a CPU generator), used where the batch is
            p = {k: v.to(x.device) for k, v in (params or self.sample(len(x), generator)).items()}
            x = self._geometry(x, p) if self.augment == "classic" else self._geometry_zoom(x, p)
            if self.illumination == "random":
                x = (x * illumination_field(self.size, p["vignette"], p["light_y"], p["light_x"], p["gradient"],
                                            p["light_angle"], x.device).to(x.dtype)).clamp_(0, 1)
            x = self._colour(x, p) if self.color == "rgb" else self._colour_lab(x, p)
            if self.grayscale > 0:
                x = to_grey(x, p["grey"])
            if self.augment == "strong":  # the per-image preset's order: sharpness, blur, field of view
                x = gaussian_blur(sharpen(x, p["sharpness"]), p["sigma"])
                x = x * microscope_mask(len(x), self.size, p["radius"], p["shift_y"], p["shift_x"], x.device)
        return (x - self.mean) / self.std

    def _geometry(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Output pixel (u, v) in [-1, 1]^2 samples the input at crop centre + R(angle) * diag(sx, sy)
        * (u, v): scale = crop half-sides, sign = flip; one grid_sample for the whole batch."""
        n = len(x)
        sx = p["w"] * torch.where(p["flip_x"], -1.0, 1.0)
        sy = p["h"] * torch.where(p["flip_y"], -1.0, 1.0)
        cos, sin = torch.cos(p["angle"]), torch.sin(p["angle"])
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos * sx, -sin * sy, p["cx"]
        theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin * sx, cos * sy, p["cy"]
        if x.shape[-1] > 2 * self.size:  # downscale first, or bilinear sampling would alias
            x = F.interpolate(x, size=(2 * self.size, 2 * self.size), mode="bilinear", antialias=True,
                              align_corners=False)
        grid = F.affine_grid(theta.to(x.dtype), [n, 3, self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _geometry_zoom(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """strong's geometry: output pixel u (in [-1, 1]^2) is rotated and flipped (v = R F u; black
        where v leaves the square: the rotation's corners), zoomed out (q = zoom * v, folded back into
        the crop by reflection: RandomZoomOut's mirrored border), and sampled in the image at crop
        centre + diag(crop half-sides) * q. One grid_sample for the whole batch."""
        n, size = len(x), self.size
        coords = pixel_centres(size, x.device, x.dtype)
        u = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), dim=-1).view(1, size * size, 2)
        fx = torch.where(p["flip_x"], -1.0, 1.0).view(-1, 1)
        fy = torch.where(p["flip_y"], -1.0, 1.0).view(-1, 1)
        cos, sin = torch.cos(p["angle"]).view(-1, 1), torch.sin(p["angle"]).view(-1, 1)
        ux, uy = u[..., 0] * fx, u[..., 1] * fy
        vx, vy = cos * ux - sin * uy, sin * ux + cos * uy
        inside = ((vx.abs() <= 1) & (vy.abs() <= 1)).to(x.dtype).view(n, 1, size, size)
        zoom = p["zoom"].view(-1, 1)
        qx, qy = reflect_unit(zoom * vx), reflect_unit(zoom * vy)
        gx = p["cx"].view(-1, 1) + p["w"].view(-1, 1) * qx
        gy = p["cy"].view(-1, 1) + p["h"].view(-1, 1) * qy
        grid = torch.stack([gx, gy], dim=-1).view(n, size, size, 2).to(x.dtype)
        if x.shape[-1] > 2 * size:  # downscale first, or bilinear sampling would alias
            x = F.interpolate(x, size=(2 * size, 2 * size), mode="bilinear", antialias=True, align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False) * inside

    def _colour(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Brightness, contrast, saturation, hue in that order (ColorJitter draws a random order),
        clamped to [0, 1] after each as torchvision does."""
        grey_w = torch.tensor(_GREY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x * p["brightness"].view(-1, 1, 1, 1)).clamp_(0, 1)
        mean = (x * grey_w).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
        c = p["contrast"].view(-1, 1, 1, 1)
        x = (c * x + (1 - c) * mean).clamp_(0, 1)
        s = p["saturation"].view(-1, 1, 1, 1)
        x = (s * x + (1 - s) * (x * grey_w).sum(1, keepdim=True)).clamp_(0, 1)
        hue = _hue_matrices(p["hue"].cpu()).to(x.device, x.dtype)
        return torch.einsum("bij,bjhw->bihw", hue, x).clamp_(0, 1)

    def _colour_lab(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return lab_jitter(x, p)


def to_grey(x: torch.Tensor, grey: torch.Tensor) -> torch.Tensor:
    """The images where `grey` (B,) is True replaced by their luminance (ITU-R 601-2 weights) in all
    three channels, as torchvision's rgb_to_grayscale(num_output_channels=3); the others as they are."""
    weights = torch.tensor(_GREY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    luminance = (x * weights).sum(1, keepdim=True).expand_as(x)
    return torch.where(grey.to(x.device).view(-1, 1, 1, 1), luminance, x)


def lab_jitter(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """RGB [0, 1] -> Lab; L* <- 50 + (L* - 50) * lab_contrast + lab_offset; (a*, b*) <- (a*, b*) *
    chroma + (da, db); -> RGB, clipped to the gamut. Per image; (B,) parameters."""
    lab = rgb_to_lab(x.float())
    v = {k: p[k].to(lab.device, lab.dtype).view(-1, 1, 1) for k in BatchAugment.LAB_RANGES}
    lab = torch.stack([(50 + (lab[:, 0] - 50) * v["lab_contrast"] + v["lab_offset"]).clamp(0, 100),
                       lab[:, 1] * v["chroma"] + v["da"], lab[:, 2] * v["chroma"] + v["db"]], dim=1)
    return lab_to_rgb(lab).to(x.dtype)


def random_convolution(x: torch.Tensor, kernel: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """alpha * x + (1 - alpha) * conv(x, kernel), per image: `kernel` (3, 3, k, k) with odd k (reflect-padded,
    so the size is kept), `alpha` (B,) in [0, 1] (1 leaves an image as it is)."""
    pad = kernel.shape[-1] // 2
    filtered = F.conv2d(F.pad(x, [pad] * 4, mode="reflect") if pad else x, kernel.to(x.dtype))
    a = alpha.to(x.dtype).view(-1, 1, 1, 1)
    return a * x + (1 - a) * filtered


class _StyleAugment(torch.nn.Module):
    """A style augmentation of the normalised float batch that leaves each image as it is with
    probability 1 - p: subclasses draw their parameters (`sample`) and apply them (`transform`)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{type(self).__name__} p={p}: use a probability in [0, 1]")
        self.p = p

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def transform(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.transform(x, params or self.sample(len(x), generator))


class RandomConvolution(_StyleAugment):
    """Random-convolution style augmentation (RandConv, Xu et al., ICLR 2021), a lever of README's
    "Models that travel": a randomly initialised convolution keeps shapes (the lesion's outline and
    structures) but changes local colour and texture, which is where dermoscopes and clinics differ;
    a model that must recognise the lesion under many such filters leans less on them. No weights to
    download. One kernel per batch (size drawn from 1, 3, 5, 7; weights N(0, 1/(3 k^2)), He-style, so
    a unit-variance input stays roughly unit-variance), blended with each image by alpha ~ U(0, 1);
    an image is left as it is with probability 1 - p. Applied to the normalised float batch, after the
    classic augmentation; training only."""

    KERNEL_SIZES = (1, 3, 5, 7)

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        k = self.KERNEL_SIZES[int(torch.randint(len(self.KERNEL_SIZES), (1,), generator=generator))]
        kernel = torch.randn(3, 3, k, k, generator=generator) / math.sqrt(3 * k * k)
        alpha = torch.rand(n, generator=generator)
        keep = torch.rand(n, generator=generator) >= self.p
        return {"kernel": kernel, "alpha": torch.where(keep, 1.0, alpha)}

    def transform(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return random_convolution(x, p["kernel"].to(x.device), p["alpha"].to(x.device))


def amplitude_mix(x: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Each image's Fourier phase with the amplitude spectrum (1 - lam) * |F(x)| + lam * |F(x[partner])|,
    per image and channel (FACT's amplitude mix, Xu et al., CVPR 2021): `partner` (B,) indices into the
    batch, `lam` (B,) in [0, 1] (0 leaves an image as it is, 1 gives it the partner's amplitudes).
    rfft2/irfft2 keep the output real: both amplitude spectra are Hermitian-symmetric, and so is the mix.
    Images with lam 0 are returned bitwise (no FFT round trip), and only the mixed ones are inverted."""
    h, w = x.shape[-2:]
    lam = lam.to(x.device)
    mixed_rows = torch.nonzero(lam > 0).flatten()
    if not len(mixed_rows):
        return x
    spectrum = torch.fft.rfft2(x.float())  # every image's: any may be a partner
    amplitude = spectrum.abs()
    a = lam[mixed_rows].to(amplitude.dtype).view(-1, 1, 1, 1)
    mixed = (1 - a) * amplitude[mixed_rows] + a * amplitude[partner.to(x.device)[mixed_rows]]
    out = x.clone()
    out[mixed_rows] = torch.fft.irfft2(torch.polar(mixed, spectrum[mixed_rows].angle()), s=(h, w)).to(x.dtype)
    return out


class AmplitudeMix(_StyleAugment):
    """Fourier amplitude mixing between the batch's images (FACT, Xu et al., CVPR 2021; the low-frequency
    variant is FDA, Yang & Soatto 2020), a lever of README's "Models that travel": an image's Fourier
    phase carries where its edges and structures are, its amplitude spectrum much of its "style"
    (overall colour, contrast, the texture's grain, a dermoscope's blur and noise). Giving an image part
    of another's amplitudes keeps the lesion and changes the style; with two training sources about half
    the partners come from the other one, so the model sees each source's lesions in the other's style.
    No weights to download. Partners: a random permutation of the batch; lam ~ U(0, 1) (FACT's eta = 1);
    an image is left as it is (lam = 0) with probability 1 - p. Applied to the normalised float batch,
    after the classic augmentation; training only; the labels stay the image's own."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        partner = torch.randperm(n, generator=generator)
        lam = torch.rand(n, generator=generator)
        keep = torch.rand(n, generator=generator) >= self.p
        return {"partner": partner, "lam": torch.where(keep, 0.0, lam)}

    def transform(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return amplitude_mix(x, p["partner"], p["lam"])
