"""Skin tone from the skin around a lesion: the individual typology angle (ITA).

Why: dermatology classifiers are known to fail more on darker skin, and public dermoscopy sets are
mostly light skin. ITA (Chardon et al. 1991) places a colour on the light-dark axis from CIELAB:
ITA = arctan((L* - 50) / b*) in degrees; higher is lighter. It is the measure used by the published
skin-tone audits of ISIC/HAM10000 (Kinyanjui et al. 2020, Groh et al. 2021), computed here on
skin pixels only, because the lesion itself is darker than the skin and would bias it.

The segmentation is deliberately simple and documented, not a lesion segmenter:
1. field of view: dermoscopes leave a dark vignette (black corners, a circular aperture); pixels
   darker than `VIGNETTE_LIGHTNESS` L* are outside the field of view;
2. lesion: Otsu's threshold on L* inside the field of view (a lesion is darker than the skin
   around it), the dark component nearest the image centre, closed and dilated so the lesion's rim
   does not count as skin;
3. skin: the field of view minus the dilated lesion; ITA from the medians of its L* and b*
   (medians: hair and reflections are a minority of skin pixels and would drag a mean).
When too little skin is left (the lesion fills the frame), or the skin has no yellow component
(b* < MIN_YELLOW: a colour cast, where the formula would call light skin "dark"), ITA is NaN with
that reason.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

VIGNETTE_LIGHTNESS = 15.0  # L* below this is the dermoscope's dark border, not skin
MIN_SKIN_FRACTION = 0.05  # of the image: less skin than this gives no reliable estimate
MIN_CONTRAST = 8.0  # L* between lesion and skin medians; below it Otsu splits skin from skin
# ITA assumes skin with a yellow component (b* > 0). Dermoscopes and cameras often leave a neutral or
# bluish cast (measured on ../shared/data: skin b* <= 0 in about a third of the images, with L* 55-95,
# which the formula would call "dark"): below this b* the angle says more about white balance than
# skin, so no estimate is given.
MIN_YELLOW = 1.0
# Bumped whenever the estimate changes, so that caches holding an older estimate decode again.
SKIN_TONE_VERSION = 2

# The standard ITA bands (Chardon 1991; Del Bino & Bernerd 2013), lightest first: (name, lower bound).
ITA_CATEGORIES: tuple[tuple[str, float], ...] = (
    ("very light", 55.0), ("light", 41.0), ("intermediate", 28.0), ("tan", 10.0), ("brown", -30.0),
    ("dark", -math.inf))


# sRGB (linear) -> XYZ, and the D65 white point (IEC 61966-2-1; CIE 15).
_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])
_D65 = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8 (..., 3) -> CIELAB float64 (D65): L* in [0, 100], a*, b* in their units.
    By the textbook formulas, not OpenCV: its float Lab path is table-based and quantises b* in
    steps of about 1/32, which moves ITA by up to half a degree."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _RGB_TO_XYZ.T / _D65
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def ita_degrees(lightness: float, b: float) -> float:
    """ITA = arctan((L* - 50) / b*) in degrees. b* = 0 (a neutral grey) gives +-90."""
    if b == 0:
        return math.copysign(90.0, lightness - 50.0) if lightness != 50.0 else 0.0
    return math.degrees(math.atan((lightness - 50.0) / b))


def ita_category(ita: float) -> str:
    """The ITA band of an angle ("very light" > 55 ... "dark" <= -30); "unknown" for NaN."""
    if ita is None or not math.isfinite(ita):
        return "unknown"
    for name, lower in ITA_CATEGORIES:
        if ita > lower:
            return name
    return ITA_CATEGORIES[-1][0]


def skin_mask(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(skin, lesion) boolean masks of a CIELAB image, by the steps in the module docstring."""
    lightness = lab[..., 0]
    h, w = lightness.shape
    fov = lightness >= VIGNETTE_LIGHTNESS
    lesion = np.zeros_like(fov)
    if fov.sum() >= 16:
        grey = np.clip(lightness * 2.55, 0, 255).astype(np.uint8)
        threshold, _ = cv2.threshold(grey[fov].reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        dark = fov & (grey <= threshold)
        if dark.any() and (~dark & fov).any():
            contrast = float(np.median(lightness[fov & ~dark]) - np.median(lightness[dark]))
            if contrast >= MIN_CONTRAST:
                n, labels, stats, centroids = cv2.connectedComponentsWithStats(dark.astype(np.uint8), 8)
                # the lesion is the largest dark component, ties broken by nearness to the centre
                # (dermoscopic images are taken centred on the lesion)
                centre = np.array([w / 2, h / 2])
                best = max(range(1, n), key=lambda i: (stats[i, cv2.CC_STAT_AREA],
                                                       -float(np.linalg.norm(centroids[i] - centre))))
                lesion = labels == best
                k = max(3, round(min(h, w) / 32) | 1)
                kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
                lesion = cv2.morphologyEx(lesion.astype(np.uint8), cv2.MORPH_CLOSE, kernel)
                lesion = cv2.dilate(lesion, kernel).astype(bool)
    return fov & ~lesion, lesion


def lesion_box(rgb: np.ndarray, max_fraction: float = 0.9) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), exclusive ends, of the lesion found by `skin_mask` in an RGB uint8 image,
    or None when none is found or it fills more than `max_fraction` of the frame (then there is
    nothing to centre on)."""
    _, lesion = skin_mask(rgb_to_lab(rgb))
    if not lesion.any() or lesion.mean() > max_fraction:
        return None
    ys, xs = np.nonzero(lesion)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def estimate_ita(rgb: np.ndarray) -> tuple[float, str]:
    """(ITA in degrees, "") from the skin around the lesion, or (NaN, reason)."""
    lab = rgb_to_lab(rgb)
    skin, _ = skin_mask(lab)
    fraction = float(skin.mean())
    if fraction < MIN_SKIN_FRACTION:
        return float("nan"), (f"too little skin outside the lesion and the dark border "
                              f"({fraction:.1%} of the image, need {MIN_SKIN_FRACTION:.0%})")
    lightness, b = float(np.median(lab[..., 0][skin])), float(np.median(lab[..., 2][skin]))
    if b < MIN_YELLOW:
        return float("nan"), (f"skin b* {b:.1f} < {MIN_YELLOW:g} (L* {lightness:.0f}): a neutral or bluish colour cast "
                              "from the camera's white balance; ITA is undefined there")
    return ita_degrees(lightness, b), ""


def category_counts(categories) -> dict[str, int]:
    """Images per ITA band, lightest first, "unknown" (no estimate) last; empty bands included."""
    import pandas as pd

    counts = pd.Series(categories, dtype="object").value_counts()
    return {name: int(counts.get(name, 0)) for name, _ in ITA_CATEGORIES} | {"unknown": int(counts.get("unknown", 0))}
