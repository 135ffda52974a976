"""Decoding: every kind of bad or unusual file named in the data-layer issue."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from melanogan.data.images import (
    ImageRejected,
    ResizeMode,
    decode_file,
    decode_image,
    equalise_local_contrast,
    hair_mask,
    normalise_exposure,
    perceptual_hash,
    remove_hair,
    shades_of_gray,
)
from tests.conftest import png_with_header_size


def _jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _gradient(w: int, h: int) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                           np.full((h, w, 1), 90, np.float32)], axis=2).astype(np.uint8)


def test_plain_jpeg_decodes_to_square_rgb_with_original_size():
    out = decode_image(_jpeg_bytes(_gradient(300, 200)), 64)
    assert out.pixels.shape == (64, 64, 3) and out.pixels.dtype == np.uint8
    assert (out.width, out.height) == (300, 200)
    assert len(out.content_hash) == 64 and len(out.phash) == 192


def test_draft_decode_matches_full_decode_closely():
    """DCT scaling must not change what the model sees beyond resampling noise."""
    arr = _gradient(1600, 1200)
    data = _jpeg_bytes(arr)
    ours = decode_image(data, 128).pixels.astype(float)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").crop((200, 0, 1400, 1200))
                      .resize((128, 128), Image.Resampling.BILINEAR, reducing_gap=2.0)).astype(float)
    assert np.abs(ours - full).mean() < 2.0


@pytest.mark.parametrize("mode", list(ResizeMode))
def test_resize_modes(mode):
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :50] = 255  # white band on the left quarter
    out = decode_image(_jpeg_bytes(arr), 40, resize_mode=mode).pixels
    left = out[20, 2].mean()
    if mode in (ResizeMode.crop, ResizeMode.lesion):  # lesion: none here, so the centre crop
        assert left < 40  # the centre crop cuts the band away
    elif mode == ResizeMode.squash:
        assert left > 200
    else:
        assert out[2, 20].mean() < 10 and out[20, 2].mean() > 200  # letterbox bars on top, band kept


def _skin_with_lesion(w: int, h: int, cx: int, cy: int, r: int) -> np.ndarray:
    arr = np.empty((h, w, 3), np.uint8)
    arr[:] = (205, 160, 140)  # skin
    cv2.circle(arr, (cx, cy), r, (90, 50, 40), -1)  # a brown lesion
    return arr


def test_lesion_crop_centres_an_off_centre_lesion_at_a_fixed_scale():
    """A lesion in the top-right of a 600x400 photograph (centre (450, 130), radius 40): the centre
    crop shows it off-centre; the lesion crop puts it in the middle at 1/LESION_MARGIN of the side."""
    from melanogan.data.images import LESION_MARGIN

    data = _jpeg_bytes(_skin_with_lesion(600, 400, 450, 130, 40))

    def lesion_stats(pixels):
        dark = pixels.mean(axis=2) < 110
        ys, xs = np.nonzero(dark)
        return xs.mean(), ys.mean(), xs.max() - xs.min() + 1

    cx, cy, _ = lesion_stats(decode_image(data, 64, resize_mode=ResizeMode.crop).pixels)
    assert abs(cx - 32) > 20  # centre crop: far right
    cx, cy, diameter = lesion_stats(decode_image(data, 64, resize_mode=ResizeMode.lesion).pixels)
    assert abs(cx - 31.5) < 1.5 and abs(cy - 31.5) < 1.5
    # the segmentation dilates the lesion by a few pixels, so the square is a little larger than 1.5 x 80
    assert 64 / LESION_MARGIN * 0.8 < diameter < 64 / LESION_MARGIN * 1.02


def test_lesion_crop_stays_inside_the_image_and_falls_back_to_the_centre():
    from melanogan.data.images import lesion_square

    # a lesion touching the left edge: the square is moved inside the image, not padded
    img = Image.fromarray(_skin_with_lesion(600, 400, 30, 200, 60))
    left, top, right, bottom = lesion_square(img)
    assert left == 0 and right - left == bottom - top and top >= 0 and bottom <= 400
    plain = Image.fromarray(np.full((400, 600, 3), 180, np.uint8))
    assert lesion_square(plain) == (100, 0, 500, 400)  # no lesion: the centre square


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageRejected) as e:
        decode_file(str(p), 32)
    assert e.value.reason == "empty-file"


def test_text_file_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not an image")
    with pytest.raises(ImageRejected) as e:
        decode_file(str(p), 32)
    assert e.value.reason == "not-an-image"


def test_truncated_jpeg():
    data = _jpeg_bytes(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8))
    with pytest.raises(ImageRejected) as e:
        decode_image(data[: len(data) // 3], 32)
    assert e.value.reason == "truncated-or-corrupt"


def test_missing_file(tmp_path):
    with pytest.raises(ImageRejected) as e:
        decode_file(str(tmp_path / "nope.jpg"), 32)
    assert e.value.reason == "missing-file"


def test_png_rgba_composited_on_black():
    arr = np.zeros((50, 50, 4), np.uint8)
    arr[..., 0] = 255
    arr[..., 3] = 128  # half transparent red
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, format="PNG")
    out = decode_image(buf.getvalue(), 16).pixels
    assert abs(int(out[8, 8, 0]) - 128) <= 2 and out[8, 8, 1] == 0


def test_greyscale_becomes_three_equal_channels():
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40), 77, np.uint8), "L").save(buf, format="PNG")
    out = decode_image(buf.getvalue(), 16).pixels
    assert out.shape == (16, 16, 3) and (out == 77).all()


def test_cmyk_jpeg_becomes_rgb():
    buf = io.BytesIO()
    Image.new("CMYK", (60, 60), (0, 255, 255, 0)).save(buf, format="JPEG")  # pure red in CMYK
    out = decode_image(buf.getvalue(), 16).pixels
    r, g, b = out[8, 8].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_16_bit_png_is_scaled_not_clipped():
    arr = np.full((40, 40), 32768, np.uint16)  # mid-grey in 16 bits
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out = decode_image(buf.getvalue(), 16).pixels
    assert abs(int(out[8, 8, 0]) - 127) <= 1


def test_exif_rotation_applied():
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :100] = 255  # left half white (landscape)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # camera rotated: display rotated 90 degrees clockwise
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(buf.getvalue(), 50, resize_mode=ResizeMode.squash)
    assert (out.width, out.height) == (100, 200)  # portrait once oriented
    assert out.pixels[5, 25].mean() > 200 and out.pixels[45, 25].mean() < 50  # white now on top


def test_huge_dimension_header_rejected_before_decoding():
    with pytest.raises(ImageRejected) as e:
        decode_image(png_with_header_size(100_000, 100_000), 32)
    assert e.value.reason == "decompression-bomb"
    assert "10,000,000,000" in e.value.detail


def test_hair_removal_removes_thin_dark_lines():
    img = np.full((128, 128, 3), (200, 160, 140), np.uint8)
    cv2.line(img, (0, 64), (127, 70), (20, 20, 20), 2)
    cleaned = remove_hair(img)
    assert img[67, 64].mean() < 60  # on the hair before
    assert cleaned[67, 64].mean() > 150  # skin-coloured after
    assert np.abs(cleaned[5:8, 100:110].astype(int) - img[5:8, 100:110]).max() <= 2  # skin untouched


@pytest.mark.parametrize("method", ["lines", "blackhat"])
def test_hair_mask_covers_a_thin_dark_line_and_nothing_else(method):
    img = np.full((128, 128, 3), (200, 160, 140), np.uint8)
    img[60:62, :] = 20  # a 2-px hair across the image
    mask = hair_mask(img, method) > 0
    # the line and the one-pixel dilation on each side: rows 59-62, every column
    assert mask[59:63].all() and mask.sum() == 4 * 128
    assert not hair_mask(np.full((64, 64, 3), 120, np.uint8), method).any()  # plain skin: no hair


def test_the_lines_mask_keeps_the_hair_and_leaves_pigment_network_and_dots():
    img = np.full((128, 128, 3), (200, 160, 140), np.uint8)
    img[100:102, :] = 20  # a 2-px hair across the image, below the lesion
    # a pigment network: a mesh of 1-px dark lines about 9 px apart, slanted as a real one is (a mesh along
    # the rows and columns would hide from the cross-shaped kernel of either mask)
    lesion = np.ascontiguousarray(img[8:72, 8:72])
    for t in range(-128, 128, 9):
        cv2.line(lesion, (t, 0), (t + 37, 64), (90, 80, 70), 1)
        cv2.line(lesion, (0, t), (64, t + 20), (90, 80, 70), 1)
    img[8:72, 8:72] = lesion
    for y, x in [(80, 20), (84, 60), (78, 100), (20, 100)]:  # dark dots (globules) on the skin
        cv2.circle(img, (x, y), 2, (60, 50, 40), -1)
    cv2.line(img, (90, 40), (100, 44), (20, 20, 20), 2)  # a short dark dash: 11 px, not a hair
    network = np.zeros((128, 128), bool)
    network[8:72, 8:72] = lesion.mean(axis=2) < 100
    old, new = hair_mask(img, "blackhat") > 0, hair_mask(img, "lines") > 0
    assert old[network].all() and old[76:90].any() and old[38:46, 88:102].any()  # network, dots, dash: all taken
    expected = np.zeros((128, 128), bool)
    expected[99:103] = True  # the hair and its one-pixel dilation, exactly
    assert np.array_equal(new, expected)


def test_shades_of_gray_neutralises_a_colour_cast():
    rng = np.random.default_rng(0)
    base = rng.uniform(60, 200, (64, 64, 1))
    cast = np.clip(base * np.array([1.3, 1.0, 0.7]), 0, 255).astype(np.uint8)
    out = shades_of_gray(cast).astype(float)
    means = out.mean(axis=(0, 1))
    assert means.max() / means.min() < 1.05
    assert cast.mean(axis=(0, 1)).max() / cast.mean(axis=(0, 1)).min() > 1.7


def test_normalise_exposure_scales_every_channel_to_the_grey_level():
    # a constant image: each channel's p-mean is its value, the grey level |(90, 120, 60)| / sqrt(3)
    img = np.empty((4, 4, 3), np.uint8)
    img[:] = (90, 120, 60)
    grey = np.sqrt(90**2 + 120**2 + 60**2) / np.sqrt(3)  # 93.27...
    out = normalise_exposure(img, 180)
    # one gain for all three channels (the colour stays), exactly level / grey, rounded
    assert out[0, 0].tolist() == [round(90 * 180 / grey), round(120 * 180 / grey), round(60 * 180 / grey)]
    assert out[0, 0].tolist() == [174, 232, 116]
    assert np.array_equal(out, np.broadcast_to(out[0, 0], out.shape))
    # a darker exposure of the same scene comes out the same (up to rounding): what the option equalises
    darker = np.rint(img * 0.6).astype(np.uint8)
    assert np.abs(normalise_exposure(darker, 180).astype(int) - out).max() <= 1
    # the p=6 mean is led by the bright pixels: half 200, half 0 -> grey 200 / 2**(1/6)
    half = np.zeros((2, 2, 3), np.uint8)
    half[0] = 200
    assert normalise_exposure(half, 180)[0, 0].tolist() == [round(200 * 180 / (200 / 2 ** (1 / 6)))] * 3 == [202] * 3
    assert normalise_exposure(half, 180)[1, 0].tolist() == [0, 0, 0]
    # brighter than the level: scaled down; saturating: clipped at 255
    assert normalise_exposure(np.full((2, 2, 3), 240, np.uint8), 120)[0, 0].tolist() == [120] * 3
    assert normalise_exposure(np.full((2, 2, 3), 10, np.uint8), 255)[0, 0].tolist() == [255] * 3
    # all black: nothing to scale (no division by zero)
    assert not normalise_exposure(np.zeros((2, 2, 3), np.uint8), 180).any()


def test_decode_applies_exposure_normalisation_after_colour_constancy():
    rng = np.random.default_rng(3)
    base = rng.uniform(40, 160, (64, 64, 1)) * np.array([1.2, 1.0, 0.8])
    data = _jpeg_bytes(np.clip(base, 0, 255).astype(np.uint8))
    plain = decode_image(data, 32, color_constancy=True).pixels
    levelled = decode_image(data, 32, color_constancy=True, white_level=180).pixels
    assert np.array_equal(levelled, normalise_exposure(plain, 180))
    assert not np.array_equal(levelled, plain)
    illuminant = np.power(np.mean(np.power(levelled.astype(float), 6), axis=(0, 1)), 1 / 6)
    assert np.allclose(illuminant, 180, atol=1.5)  # neutral (colour constancy) and at the level asked for


def test_local_contrast_equalisation_stretches_lightness_and_keeps_the_colour():
    # one tile, a lightness ramp of 64 grey levels (L 96..159): CLAHE with a clip limit high enough that
    # nothing is clipped is plain histogram equalisation, so the ramp is spread over the full 0..255
    ramp = np.repeat(np.arange(96, 160, dtype=np.uint8)[None, :], 64, axis=0)
    grey = np.stack([ramp] * 3, axis=-1)
    lab = cv2.cvtColor(grey, cv2.COLOR_RGB2LAB)
    out = equalise_local_contrast(grey, 40, tiles=1)
    out_lab = cv2.cvtColor(out, cv2.COLOR_RGB2LAB)
    L_in, L_out = lab[0, :, 0].astype(int), out_lab[0, :, 0].astype(int)
    assert L_out.min() <= 8 and L_out.max() >= 250  # stretched to (nearly) the full range
    assert np.all(np.diff(L_out) >= 0) and len(np.unique(L_out)) == len(np.unique(L_in))  # order kept
    # no bin reaches the clip limit (40 x the mean bin count): each L level maps to 255 x its cumulative
    # share of the pixels, as in plain histogram equalisation (the round trip through RGB: +-2)
    cdf = {int(v): np.count_nonzero(lab[..., 0] <= v) / lab[..., 0].size for v in np.unique(L_in)}
    assert np.abs(L_out - np.array([round(255 * cdf[int(v)]) for v in L_in])).max() <= 2
    # a low clip limit stretches less (the excess of each bin is spread over all bins)
    assert np.ptp(cv2.cvtColor(equalise_local_contrast(grey, 1.0, tiles=1), cv2.COLOR_RGB2LAB)[..., 0]) < \
        np.ptp(L_out) - 50
    # grey stays grey: only the lightness is equalised, a and b are kept
    assert np.abs(out.astype(int) - out[..., :1].astype(int)).max() <= 1
    # and a coloured image keeps its hue: a and b within the Lab<->RGB round trip
    tinted = np.clip(grey.astype(int) * np.array([1.15, 1.0, 0.85]), 0, 255).astype(np.uint8)
    ab_in = cv2.cvtColor(tinted, cv2.COLOR_RGB2LAB)[..., 1:].astype(int)
    ab_out = cv2.cvtColor(equalise_local_contrast(tinted, 2.0), cv2.COLOR_RGB2LAB)[..., 1:].astype(int)
    assert np.abs(ab_out - ab_in).max() <= 4
    # 0 is off: the pixels unchanged (a copy)
    assert np.array_equal(equalise_local_contrast(tinted, 0), tinted)


def test_decode_equalises_local_contrast_last():
    rng = np.random.default_rng(4)
    base = rng.uniform(90, 150, (64, 64, 1)) * np.array([1.2, 1.0, 0.8])
    data = _jpeg_bytes(np.clip(base, 0, 255).astype(np.uint8))
    levelled = decode_image(data, 32, color_constancy=True, white_level=180).pixels
    equalised = decode_image(data, 32, color_constancy=True, white_level=180, clahe=2.0).pixels
    assert np.array_equal(equalised, equalise_local_contrast(levelled, 2.0))  # after exposure, on its output
    L = [cv2.cvtColor(x, cv2.COLOR_RGB2LAB)[..., 0].std() for x in (levelled, equalised)]
    assert L[1] > 1.3 * L[0]  # low-contrast noise stretched


def test_perceptual_hash_matches_resized_and_centre_cropped_copies():
    from melanogan.data.dedup import hamming_pairs
    from melanogan.data.demo import render_phantom

    a = render_phantom(np.random.default_rng(0), True, 400, 300)
    b = render_phantom(np.random.default_rng(1), True, 400, 300)
    squashed = cv2.resize(a, (224, 224), interpolation=cv2.INTER_AREA)
    cropped = cv2.resize(a[:, 50:350], (180, 180), interpolation=cv2.INTER_AREA)
    hashes = np.array([perceptual_hash(x) for x in (a, squashed, cropped, b)])
    pairs = {(int(i), int(j)) for i, j, _ in hamming_pairs(hashes, 22)}
    assert {(0, 1), (0, 2), (1, 2)} <= pairs
    assert not any(3 in p for p in pairs)
