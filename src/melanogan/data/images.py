"""Decode a dermoscopic image once, at reduced size, into an RGB uint8 array.

Why this file exists: the original study decoded full-resolution JPEGs (up to 6000x4000) on every
epoch. Here each file is read once; JPEG DCT scaling (Pillow `draft`) decodes at 1/2, 1/4 or 1/8
of full size directly, which is ~10x cheaper than a full decode followed by a resize.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from enum import StrEnum

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

# We do our own pixel-count check (below) so Pillow's global guard never raises mid-run.
DEFAULT_MAX_PIXELS = 150_000_000  # ISIC originals are at most ~30 MP; 150 MP leaves room, stops bombs.


class ResizeMode(StrEnum):
    crop = "crop"  # centre square crop, then resize: no distortion (the default)
    squash = "squash"  # resize to a square ignoring aspect ratio (what HAM10000 224px copies did)
    pad = "pad"  # letterbox onto black: keeps the whole field of view
    # A square around the lesion (data/skin.py's segmentation), LESION_MARGIN times its larger side:
    # clinics frame lesions at different scales, and a blind centre crop passes that on. Centre crop
    # when no lesion is found.
    lesion = "lesion"


LESION_MARGIN = 1.5  # square side / lesion's larger side: some skin around it, as in a centred photograph
LESION_MIN_SIDE = 0.3  # of the short side: a speck found on the skin does not become the whole image


class ImageRejected(Exception):
    """The file is not a usable image; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # (size, size, 3) uint8
    width: int  # original width after EXIF orientation
    height: int
    content_hash: str  # sha256 of the file bytes
    phash: str  # perceptual hashes of 3 views, hex (see perceptual_hash)
    ita: float = float("nan")  # skin tone (data/skin.py), when asked for; NaN with ita_reason otherwise
    ita_reason: str = ""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. 16-bit and float images are scaled, alpha is composited on black."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0  # 0..65535 -> 0..255
        else:
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            if mode == "I" and lo >= 0 and hi <= 65535 and hi > 255:
                arr = arr / 257.0  # 16-bit PNGs often open as mode "I"
            elif hi > 255 or lo < 0:
                arr = (arr - lo) / max(hi - lo, 1e-9) * 255.0
        grey = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB;16" or mode.startswith("BGR"):
        return img.convert("RGB")
    return img.convert("RGB")  # L, P, CMYK (Pillow undoes Adobe inversion), YCbCr, 1, LAB, HSV


PHASH_BITS = 256  # per view: a 16x16 block of low DCT frequencies
PHASH_VIEWS = 3  # whole image, centre 75% of the width, centre 75% of the height


def _dct_hash(grey: np.ndarray) -> bytes:
    small = cv2.resize(grey, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:16, :16].flatten()
    low[0] = np.median(low[1:])  # the DC term only encodes brightness: neutralise it
    return np.packbits(low > np.median(low)).tobytes()


def perceptual_hash(rgb: np.ndarray) -> str:
    """Perceptual hash of three views of the image, as 3 x 64 hex digits.

    Each view is squashed to 64x64 and hashed by the signs of its 16x16 lowest DCT frequencies
    around their median (256 bits). Datasets copy the same photograph by squashing it to a square
    (HAM10000 224px) or by centre-cropping it (the ISIC 9-class set): matching the whole view of
    one image against all three views of the other finds both kinds of copy.
    """
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    h, w = grey.shape
    cw, ch = max(1, round(w * 0.75)), max(1, round(h * 0.75))
    views = [grey, grey[:, (w - cw) // 2:(w - cw) // 2 + cw], grey[(h - ch) // 2:(h - ch) // 2 + ch, :]]
    return b"".join(_dct_hash(v) for v in views).hex()


def lesion_square(img: Image.Image) -> tuple[int, int, int, int]:
    """The crop box of `ResizeMode.lesion` in `img`'s pixels: a square centred on the lesion, side
    LESION_MARGIN x its larger side (at least LESION_MIN_SIDE, at most the short side of the image),
    moved inside the image; the centre square when no lesion is found."""
    from melanogan.data.skin import lesion_box

    w, h = img.size
    short = min(w, h)
    scale = min(1.0, 256 / max(w, h))  # segment a thumbnail: the box needs no more detail
    thumb = img if scale == 1.0 else img.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                Image.Resampling.BILINEAR, reducing_gap=2.0)
    box = lesion_box(np.asarray(thumb))
    if box is None:
        left, top = (w - short) // 2, (h - short) // 2
        return left, top, left + short, top + short
    x0, y0, x1, y1 = (v / scale for v in box)
    side = round(min(short, max(LESION_MIN_SIDE * short, LESION_MARGIN * max(x1 - x0, y1 - y0))))
    left = round(min(max((x0 + x1) / 2 - side / 2, 0), w - side))
    top = round(min(max((y0 + y1) / 2 - side / 2, 0), h - side))
    return left, top, left + side, top + side


def _fit(img: Image.Image, size: int, mode: ResizeMode) -> Image.Image:
    w, h = img.size
    if mode == ResizeMode.lesion:
        return img.resize((size, size), Image.Resampling.BILINEAR, box=lesion_square(img), reducing_gap=2.0)
    if mode == ResizeMode.crop:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side),
                          reducing_gap=2.0)
    if mode == ResizeMode.squash:
        return img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    inner = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=2.0)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(inner, ((size - nw) // 2, (size - nh) // 2))
    return canvas


class HairMethod(StrEnum):
    """How `hair_mask` finds hair. `lines` (the default) keeps only long, thin dark lines; `blackhat`
    is the mask melanogan used before (every thin dark structure, pigment network and dots included),
    kept so caches and runs prepared with it are decoded as they were trained."""

    lines = "lines"
    blackhat = "blackhat"


# Thresholds of the `lines` mask, as shares of the image side so the same hair is kept at 128 or 512 px.
# A hair crosses much of the field of view: a dark component counts as hair when the long side of its
# minimum-area rectangle is at least HAIR_MIN_LENGTH of the image side (a network cell edge, a dot or a
# globule is far shorter) and its mean width (area / that length) at most HAIR_MAX_WIDTH (a pigment
# network forms one wide mesh, a blob is as wide as it is long). Chosen by eye on 450 images of the three
# sources in ../shared/data (docs/hair-mask-examples.jpg); the pixel shares are in README.
HAIR_MIN_LENGTH = 0.15
HAIR_MAX_WIDTH = 0.03


def _dark_thin_structure(rgb: np.ndarray) -> np.ndarray:
    """Black-hat morphology: pixels darker than their surroundings by more than 10 grey levels, in
    structures narrower than the kernel (which scales with the image)."""
    k = max(3, round(rgb.shape[0] / 256 * 17) | 1)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    kernel = cv2.getStructuringElement(cv2.MORPH_CROSS, (k, k))
    blackhat = cv2.morphologyEx(grey, cv2.MORPH_BLACKHAT, kernel)
    _, mask = cv2.threshold(blackhat, 10, 255, cv2.THRESH_BINARY)
    return mask


def _long_thin_components(mask: np.ndarray) -> np.ndarray:
    """The connected components of `mask` that are long and thin enough to be hair (see HAIR_MIN_LENGTH)."""
    side = mask.shape[0]
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(n, bool)
    for i in range(1, n):
        area = int(stats[i, cv2.CC_STAT_AREA])
        if area < HAIR_MIN_LENGTH * side:  # too few pixels to be a line that long: skip the rectangle
            continue
        # within the component's bounding box: a full-image comparison per component is most of the cost
        bx, by, bw, bh = stats[i, :4]
        points = np.column_stack(np.nonzero(labels[by:by + bh, bx:bx + bw] == i)).astype(np.float32)
        _, (w, h), _ = cv2.minAreaRect(points)
        length = max(w, h)
        keep[i] = length >= HAIR_MIN_LENGTH * side and area / length <= HAIR_MAX_WIDTH * side
    return np.where(keep[labels], 255, 0).astype(np.uint8)


def hair_mask(rgb: np.ndarray, method: HairMethod | str = HairMethod.lines) -> np.ndarray:
    """The pixels `remove_hair` inpaints (uint8, 255 = hair), dilated by one pixel to cover the soft
    edges. `blackhat` takes every thin dark structure: measured on ../shared/data at 256 px
    (studies/hair_by_source.py) that is 17-42% of a source's pixels on average, mostly pigment network,
    dots and globules, which are signs of the diagnosis. `lines` keeps only its long, thin components."""
    mask = _dark_thin_structure(rgb)
    if HairMethod(method) == HairMethod.lines:
        mask = _long_thin_components(mask)
    return cv2.dilate(mask, np.ones((3, 3), np.uint8), iterations=1)


def remove_hair(rgb: np.ndarray, method: HairMethod | str = HairMethod.lines) -> np.ndarray:
    """DullRazor-style hair removal: the pixels of `hair_mask` are inpainted from their surroundings."""
    return cv2.inpaint(rgb, hair_mask(rgb, method), max(1, rgb.shape[0] // 128), cv2.INPAINT_TELEA)


def _illuminant(img: np.ndarray, p: int) -> np.ndarray:
    """The illuminant's estimate of Shades of Gray: each channel's Minkowski p-norm mean (float32 in)."""
    return np.power(np.mean(np.power(img, p), axis=(0, 1)), 1.0 / p)


def shades_of_gray(rgb: np.ndarray, p: int = 6) -> np.ndarray:
    """Shades of Gray colour constancy (Finlayson & Trezzi, p=6 as in ISIC-winning pipelines):
    estimate the illuminant as the Minkowski p-norm mean per channel and rescale to neutral grey."""
    img = rgb.astype(np.float32)
    illuminant = _illuminant(img, p)
    norm = float(np.sqrt(np.sum(illuminant**2)))
    if norm <= 0:
        return rgb.copy()
    illuminant = illuminant / norm
    out = img / (illuminant * np.sqrt(3.0))
    return np.clip(out, 0, 255).astype(np.uint8)


def normalise_exposure(rgb: np.ndarray, level: float, p: int = 6) -> np.ndarray:
    """Scale an image so that its illuminant's grey level is `level` (exposure normalisation, the
    magnitude that `shades_of_gray` leaves as captured: it divides by the illuminant's direction only).
    The illuminant is estimated as in Shades of Gray (the Minkowski p-norm mean per channel); its grey
    level is that vector's length over sqrt(3), i.e. the common value of the three channel means after
    Shades of Gray. Every channel is multiplied by the same gain level / grey, so colours stay as they
    are and only the exposure (a dermoscope's brightness, its camera's gain) is equalised. Why: on
    ../shared/data the grey level differs by source (medians at 96 px: HAM10000 171, the ISIC set 174,
    Derm7pt 198), a difference that colour constancy keeps."""
    img = rgb.astype(np.float32)
    illuminant = _illuminant(img, p)
    grey = float(np.sqrt(np.sum(illuminant**2)) / np.sqrt(3.0))
    if grey <= 0:  # an all-black image has no exposure to correct
        return rgb.copy()
    return np.clip(np.rint(img * (level / grey)), 0, 255).astype(np.uint8)


CLAHE_TILES = 8  # tiles per side: a fixed share of the image (1/8), so the cache size does not change the result


def equalise_local_contrast(rgb: np.ndarray, clip: float, tiles: int = CLAHE_TILES) -> np.ndarray:
    """CLAHE (contrast-limited adaptive histogram equalisation, Zuiderveld 1994) on the lightness only:
    the image is converted to CIELAB, L is equalised within each of tiles x tiles regions (each region's
    histogram clipped at `clip` times its mean bin count, the excess spread over all bins, so flat skin
    is not stretched into noise), the regions blended bilinearly, and a and b kept, so hue and
    saturation stay as colour constancy left them. Why: after colour constancy and exposure
    normalisation the sources still differ in contrast (median lightness standard deviation at 96 px
    over 300 images each: HAM10000 31, the ISIC set 25, Derm7pt 40: dermoscopes, polarised or not,
    immersion fluid), and equalising local contrast is a standard dermoscopy preprocessing step."""
    if clip <= 0:
        return rgb.copy()
    lab = cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2LAB)
    clahe = cv2.createCLAHE(clipLimit=float(clip), tileGridSize=(tiles, tiles))
    lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def decode_image(
    data: bytes,
    size: int,
    resize_mode: ResizeMode = ResizeMode.crop,
    hair_removal: bool = False,
    color_constancy: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    hair_method: HairMethod | str = HairMethod.lines,
    skin_tone: bool = False,
    white_level: int = 0,
    clahe: float = 0.0,
) -> DecodedImage:
    """Decode file bytes into a `size`x`size` RGB uint8 array plus the facts the manifest needs.
    `white_level` (0: off): after colour constancy, `normalise_exposure` to that grey level.
    `clahe` (0: off): last, `equalise_local_contrast` with that clip limit.
    `skin_tone`: also estimate the ITA of the skin around the lesion (on the pixels as captured,
    before hair removal and colour constancy, which would neutralise the skin's colour).

    Raises ImageRejected with a reason code: `empty-file`, `not-an-image`, `decompression-bomb`,
    `truncated-or-corrupt`, `too-small`.
    """
    if len(data) == 0:
        raise ImageRejected("empty-file", "the file has zero bytes")
    content_hash = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = None  # our own check below applies before any pixel is decoded
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageRejected("decompression-bomb",
                                    f"{w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,}")
            if w < 8 or h < 8:
                raise ImageRejected("too-small", f"{w}x{h} is too small to be a dermoscopic image")
            orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
            if img.format == "JPEG":
                # Ask for the smallest DCT scale whose result still covers `size` on the short side.
                # (at least 128 px: the perceptual hash needs that much detail whatever the cache size)
                # A lesion crop may keep only LESION_MIN_SIDE of the short side: decode enough for that.
                short = min(w, h) * (LESION_MIN_SIDE if resize_mode == ResizeMode.lesion else 1.0)
                scale = max(1.0, short / max(size, 128))
                img.draft("RGB", (int(w / scale), int(h / scale)))
            img.load()
            img = _to_rgb(img)
            if orientation in (2, 3, 4, 5, 6, 7, 8):
                img = _apply_orientation(img, orientation)
                if orientation in (5, 6, 7, 8):
                    w, h = h, w
            rgb_full = np.asarray(img)
            fitted = np.asarray(_fit(img, size, resize_mode))
    except ImageRejected:
        raise
    except UnidentifiedImageError as exc:
        raise ImageRejected("not-an-image", "Pillow cannot identify the format (not an image file?)") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageRejected("truncated-or-corrupt", f"{type(exc).__name__}: {exc}") from exc
    pixels = np.ascontiguousarray(fitted, dtype=np.uint8)
    ita, ita_reason = (float("nan"), "not estimated")
    if skin_tone:
        from melanogan.data.skin import estimate_ita

        ita, ita_reason = estimate_ita(pixels)
    if hair_removal:
        pixels = remove_hair(pixels, hair_method)
    if color_constancy:
        pixels = shades_of_gray(pixels)
    if white_level:
        pixels = normalise_exposure(pixels, white_level)
    if clahe:
        pixels = equalise_local_contrast(pixels, clahe)
    return DecodedImage(pixels=pixels, width=int(w), height=int(h), content_hash=content_hash,
                        phash=perceptual_hash(rgb_full), ita=ita, ita_reason=ita_reason)


_TRANSPOSE = {
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_270],
    7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_90],
}


def _apply_orientation(img: Image.Image, orientation: int) -> Image.Image:
    for op in _TRANSPOSE[orientation]:
        img = img.transpose(op)
    return img


def decode_file(path: str, size: int, **options) -> DecodedImage:
    """Read and decode one file; a missing or unreadable file raises ImageRejected."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as exc:
        raise ImageRejected("missing-file", f"{path} does not exist") from exc
    except OSError as exc:
        raise ImageRejected("unreadable-file", f"{path}: {exc}") from exc
    return decode_image(data, size, **options)
