"""Skin tone (ITA) on constructed images with known CIELAB values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from melanogan.data.skin import category_counts, estimate_ita, ita_category, ita_degrees, rgb_to_lab


def _srgb_to_lab(rgb) -> np.ndarray:
    """CIELAB of sRGB uint8 colours by the textbook formulas (D65), independent of OpenCV."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
    x, y, z = m @ lin / np.array([0.950456, 1.0, 1.088754])
    f = lambda t: t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116  # noqa: E731
    return np.array([116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))])


def _skin_with_lesion(skin_rgb, size=96, radius=20, centre=None, vignette=False) -> np.ndarray:
    img = np.empty((size, size, 3), np.uint8)
    img[:] = skin_rgb
    yy, xx = np.mgrid[:size, :size]
    cy, cx = centre or (size // 2, size // 2)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = (60, 35, 25)  # a dark brown lesion
    if vignette:  # a dermoscope's black corners outside a circular field of view
        img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 > (0.55 * size) ** 2] = (3, 3, 3)
    return img


@pytest.mark.parametrize("rgb, lab", [((255, 255, 255), (100.0, 0.0, 0.0)), ((0, 0, 0), (0.0, 0.0, 0.0)),
                                      ((255, 0, 0), (53.2408, 80.0925, 67.2032)),
                                      ((0, 0, 255), (32.2970, 79.1875, -107.8602)),
                                      ((128, 128, 128), (53.5850, 0.0, 0.0))])
def test_rgb_to_lab_matches_published_reference_values(rgb, lab):
    assert rgb_to_lab(np.array(rgb, np.uint8)) == pytest.approx(lab, abs=2e-3)


def test_ita_formula_exact_values():
    assert ita_degrees(75.0, 25.0) == pytest.approx(45.0)
    assert ita_degrees(50.0, 17.0) == 0.0
    assert ita_degrees(30.0, 20.0) == pytest.approx(math.degrees(math.atan(-1.0)))
    assert ita_degrees(80.0, 0.0) == 90.0 and ita_degrees(20.0, 0.0) == -90.0


@pytest.mark.parametrize("ita, band", [(70, "very light"), (55.01, "very light"), (55, "light"), (41.5, "light"),
                                       (30, "intermediate"), (10.5, "tan"), (10, "brown"), (-29.9, "brown"),
                                       (-30, "dark"), (float("nan"), "unknown")])
def test_ita_bands(ita, band):
    assert ita_category(ita) == band


@pytest.mark.parametrize("skin", [(233, 196, 170), (198, 146, 110), (120, 80, 58)])
@pytest.mark.parametrize("vignette", [False, True])
def test_ita_of_uniform_skin_around_a_dark_lesion_is_the_skins(skin, vignette):
    lab = _srgb_to_lab(skin)
    expected = math.degrees(math.atan((lab[0] - 50) / lab[2]))
    ita, reason = estimate_ita(_skin_with_lesion(skin, vignette=vignette))
    assert reason == "" and ita == pytest.approx(expected, abs=0.05)


def test_an_off_centre_lesion_and_lighter_hair_strands_do_not_move_the_estimate():
    skin = (210, 160, 125)
    img = _skin_with_lesion(skin, centre=(30, 60))
    img[70:72, 5:90] = (40, 30, 25)  # a hair across the skin: a minority of skin pixels
    lab = _srgb_to_lab(skin)
    assert estimate_ita(img)[0] == pytest.approx(math.degrees(math.atan((lab[0] - 50) / lab[2])), abs=0.05)


def test_a_lesion_filling_the_frame_gives_nan_with_a_reason():
    img = _skin_with_lesion((220, 180, 150), radius=62)  # only the corners are skin
    ita, reason = estimate_ita(img)
    assert math.isnan(ita) and "too little skin" in reason


def test_category_counts_lists_every_band_lightest_first():
    counts = category_counts(["light", "light", "dark", "unknown"])
    assert list(counts) == ["very light", "light", "intermediate", "tan", "brown", "dark", "unknown"]
    assert counts == {"very light": 0, "light": 2, "intermediate": 0, "tan": 0, "brown": 0, "dark": 1, "unknown": 1}


def test_skin_without_a_yellow_component_gets_no_estimate():
    """Light skin under a bluish white balance (b* < 0): the formula would say "dark"; no estimate."""
    img = _skin_with_lesion((196, 204, 214))  # L* about 82, b* about -5
    assert _srgb_to_lab((196, 204, 214))[2] < 0
    ita, reason = estimate_ita(img)
    assert math.isnan(ita) and "colour cast" in reason and ita_category(ita) == "unknown"
