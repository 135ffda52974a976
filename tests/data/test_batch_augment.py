"""Batch augmentation: exact outputs on constructed images for each operation, and the parameter
distribution of the classic preset."""

from __future__ import annotations

import math

import pytest
import torch

from melanogan.data.batch_augment import BatchAugment
from melanogan.data.transforms import ToNormalizedFloat

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # no normalisation: outputs are pixels / 255


def _image(size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _params(**changes) -> dict[str, torch.Tensor]:
    p = {"w": 1.0, "h": 1.0, "cx": 0.0, "cy": 0.0, "flip_x": False, "flip_y": False, "angle": 0.0,
         "brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}
    p.update(changes)
    return {k: torch.tensor([v]) for k, v in p.items()}


def test_identity_parameters_leave_the_image_as_it_is():
    x = _image()
    out = BatchAugment(8, mean=MEAN, std=STD)(x, params=_params())
    assert torch.allclose(out, x.float() / 255, atol=1e-5)
    normalised = BatchAugment(8)(x, params=_params())  # ImageNet normalisation, as the eval preset
    assert torch.allclose(normalised[0], ToNormalizedFloat((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(x[0]),
                          atol=1e-4)


def test_flips_rotation_and_crop_are_exact_on_pixel_grids():
    x = _image()
    aug = BatchAugment(8, mean=MEAN, std=STD)
    ref = x.float() / 255
    assert torch.allclose(aug(x, params=_params(flip_x=True)), ref.flip(-1), atol=1e-5)
    assert torch.allclose(aug(x, params=_params(flip_y=True)), ref.flip(-2), atol=1e-5)
    assert torch.allclose(aug(x, params=_params(angle=math.pi / 2)), torch.rot90(ref, 1, (-2, -1)), atol=1e-5)
    crop = BatchAugment(4, mean=MEAN, std=STD)(x, params=_params(w=0.5, h=0.5))  # the central half, at 4 px
    assert torch.allclose(crop, ref[..., 2:6, 2:6], atol=1e-5)
    shifted = BatchAugment(4, mean=MEAN, std=STD)(x, params=_params(w=0.5, h=0.5, cx=0.5, cy=-0.5))
    assert torch.allclose(shifted, ref[..., 0:4, 4:8], atol=1e-5)  # right half, top half


def test_colour_operations_are_exact():
    x = _image()
    aug = BatchAugment(8, mean=MEAN, std=STD)
    ref = x.float() / 255
    assert torch.allclose(aug(x, params=_params(brightness=1.1)), (ref * 1.1).clamp(0, 1), atol=1e-5)
    grey = aug(x, params=_params(saturation=0.0))
    expected = (ref * torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert torch.allclose(grey, expected.expand_as(grey), atol=1e-5)
    flat = aug(x, params=_params(contrast=0.0))  # contrast 0: every pixel the image's mean grey
    assert torch.allclose(flat, expected.mean().expand_as(flat), atol=1e-5)
    greyish = torch.full((1, 3, 8, 8), 128, dtype=torch.uint8)
    assert torch.allclose(aug(greyish, params=_params(hue=0.02)), greyish.float() / 255, atol=1e-5)  # grey has no hue


def test_parameters_follow_the_classic_preset():
    p = BatchAugment(64).sample(20000, torch.Generator().manual_seed(0))
    area = p["w"] * p["h"]
    assert float(area.min()) >= 0.6 - 1e-6 and float(area.max()) <= 1.0 + 1e-6
    assert float((p["cx"].abs() + p["w"]).max()) <= 1.0 + 1e-6  # the crop stays inside the image
    assert abs(float(p["flip_x"].float().mean()) - 0.5) < 0.02 and abs(float(p["flip_y"].float().mean()) - 0.5) < 0.02
    assert float(p["angle"].min()) < -3.0 and float(p["angle"].max()) > 3.0
    for key, (lo, hi) in {"brightness": (0.85, 1.15), "contrast": (0.85, 1.15), "saturation": (0.9, 1.1),
                          "hue": (-0.02, 0.02)}.items():
        assert lo <= float(p[key].min()) and float(p[key].max()) <= hi
    again = BatchAugment(64).sample(20000, torch.Generator().manual_seed(0))
    assert all(torch.equal(again[k], p[k]) for k in p)  # the generator makes it repeatable
    with pytest.raises(TypeError, match="uint8"):
        BatchAugment(8)(torch.zeros(1, 3, 8, 8))


def test_random_convolution_is_exact_on_constructed_kernels():
    from melanogan.data.batch_augment import random_convolution

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4) / 10
    identity = torch.eye(3).view(3, 3, 1, 1)
    assert torch.allclose(random_convolution(x, identity, torch.tensor([0.0, 0.3])), x, atol=1e-6)
    swap = identity[[2, 0, 1]]  # output R = input B, G = R, B = G
    out = random_convolution(x, swap, torch.tensor([0.0, 1.0]))
    assert torch.equal(out[0], x[0, [2, 0, 1]]) and torch.equal(out[1], x[1])  # alpha 1 leaves image 2 alone
    # a 3x3 box filter of channel 0 into every channel, reflect-padded, blended 1/4 original + 3/4 filtered
    box = torch.zeros(3, 3, 3, 3)
    box[:, 0] = 1 / 9
    padded = torch.nn.functional.pad(x[:, :1], [1, 1, 1, 1], mode="reflect")
    filtered = torch.stack([padded[:, 0, i:i + 3, j:j + 3].mean(dim=(-2, -1)) for i in range(4) for j in range(4)],
                           -1).view(2, 1, 4, 4)
    out = random_convolution(x, box, torch.tensor([0.25, 0.25]))
    assert torch.allclose(out, 0.25 * x + 0.75 * filtered.expand(2, 3, 4, 4), atol=1e-6)
    assert x[0, 0, 0, 0] != filtered[0, 0, 0, 0]  # the padding and the blend are both exercised


def test_random_convolution_draws_as_documented():
    from melanogan.data.batch_augment import RandomConvolution

    gen = torch.Generator().manual_seed(0)
    sizes, stds = [], {}
    for _ in range(400):
        p = RandomConvolution(p=0.5).sample(64, gen)
        k = p["kernel"].shape[-1]
        sizes.append(k)
        stds.setdefault(k, []).append(p["kernel"].flatten())
    assert set(sizes) == {1, 3, 5, 7}
    for k, w in stds.items():  # He-style: N(0, 1/(3 k^2))
        assert torch.cat(w).std().item() == pytest.approx(1 / math.sqrt(3 * k * k), rel=0.1)
    alpha = torch.cat([RandomConvolution(p=0.5).sample(1000, gen)["alpha"] for _ in range(5)])
    assert (alpha == 1).float().mean().item() == pytest.approx(0.5, abs=0.03)  # p of the images untouched
    changed = alpha[alpha < 1]
    assert changed.mean().item() == pytest.approx(0.5, abs=0.03)  # alpha ~ U(0, 1)
    assert torch.equal(RandomConvolution(p=0.0).sample(100, gen)["alpha"], torch.ones(100))
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(RandomConvolution(p=0.0)(x, gen), x)
    with pytest.raises(ValueError, match="probability"):
        RandomConvolution(p=1.5)


def test_amplitude_mix_keeps_the_phase_and_mixes_the_amplitudes():
    from melanogan.data.batch_augment import amplitude_mix

    # Constant images have only a DC term: amplitude |c|, phase 0 or pi. Mixing 0.25 of a partner's
    # amplitude gives 0.75 * 0.2 + 0.25 * 0.6 = 0.3, with the image's own sign (phase pi for -0.2).
    x = torch.stack([torch.full((3, 4, 6), 0.2), torch.full((3, 4, 6), -0.2), torch.full((3, 4, 6), 0.6)])
    out = amplitude_mix(x, torch.tensor([2, 2, 0]), torch.tensor([0.25, 0.25, 0.0]))
    assert torch.allclose(out[0], torch.full((3, 4, 6), 0.3), atol=1e-6)
    assert torch.allclose(out[1], torch.full((3, 4, 6), -0.3), atol=1e-6)
    assert torch.equal(out[2], x[2])  # lam 0: unchanged, bitwise
    # A stripe keeps where its edges are (phase) and takes the partner's contrast (amplitude): the
    # square wave 0/1 mixed fully with the same wave at contrast 0/3 becomes that wave (same phase).
    stripe = torch.zeros(1, 8, 8)
    stripe[:, :, :4] = 1.0
    y = torch.stack([stripe, 3 * torch.roll(stripe, 2, dims=-1)])
    out = amplitude_mix(y, torch.tensor([1, 0]), torch.tensor([1.0, 0.0]))
    assert torch.allclose(out[0], 3 * stripe, atol=1e-5)  # the partner's amplitudes at its own place
    assert torch.allclose(out[1], y[1], atol=1e-5)
    # the result is real and in the input's dtype, the spectrum's amplitude the stated mix
    z = torch.randn(4, 3, 8, 10, generator=torch.Generator().manual_seed(0))
    lam = torch.tensor([0.0, 0.3, 0.7, 1.0])
    partner = torch.tensor([1, 2, 3, 0])
    out = amplitude_mix(z, partner, lam)
    assert out.dtype == z.dtype and out.shape == z.shape
    a = lam.view(-1, 1, 1, 1)
    want = (1 - a) * torch.fft.rfft2(z).abs() + a * torch.fft.rfft2(z[partner]).abs()
    assert torch.allclose(torch.fft.rfft2(out).abs(), want, atol=1e-4)


def test_amplitude_mix_draws_as_documented():
    from melanogan.data.batch_augment import AmplitudeMix

    gen = torch.Generator().manual_seed(0)
    draws = [AmplitudeMix(p=0.5).sample(1000, gen) for _ in range(5)]
    assert all(torch.equal(d["partner"].sort().values, torch.arange(1000)) for d in draws)  # a permutation
    lam = torch.cat([d["lam"] for d in draws])
    assert (lam == 0).float().mean().item() == pytest.approx(0.5, abs=0.03)  # 1 - p of the images untouched
    assert lam[lam > 0].mean().item() == pytest.approx(0.5, abs=0.03)  # lam ~ U(0, 1)
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(AmplitudeMix(p=0.0)(x, gen), x)
    with pytest.raises(ValueError, match="probability"):
        AmplitudeMix(p=-0.1)


def test_cielab_conversion_matches_the_published_values():
    from melanogan.data.batch_augment import lab_to_rgb, rgb_to_lab

    # sRGB primaries, white and mid-grey in CIELAB (D65), as tabulated (e.g. Lindbloom's calculator)
    rgb = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]])
    expected = torch.tensor([[53.24, 80.09, 67.20], [87.73, -86.18, 83.18], [32.30, 79.19, -107.86],
                             [100.0, 0.0, 0.0], [53.39, 0.0, 0.0]])
    lab = rgb_to_lab(rgb.view(5, 3, 1, 1)).view(5, 3)
    assert torch.allclose(lab, expected, atol=0.01)
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(lab_to_rgb(rgb_to_lab(x)), x, atol=1e-5)  # the inverse


def _lab_params(**changes) -> dict[str, torch.Tensor]:
    p = {"lab_contrast": 1.0, "lab_offset": 0.0, "chroma": 1.0, "da": 0.0, "db": 0.0}
    p.update(changes)
    return {**_params(), **{k: torch.tensor([v]) for k, v in p.items()}}


def test_lab_colour_step_is_exact():
    from melanogan.data.batch_augment import rgb_to_lab

    x = _image()
    ref = x.float() / 255
    aug = BatchAugment(8, mean=MEAN, std=STD, color="lab")
    assert torch.allclose(aug(x, params=_lab_params()), ref, atol=1e-5)  # identity parameters
    grey = torch.full((1, 3, 8, 8), 128, dtype=torch.uint8)
    lab_grey = rgb_to_lab(grey.float() / 255)
    cast = rgb_to_lab(aug(grey, params=_lab_params(da=5.0, db=-3.0)))  # a white-point shift tints grey
    assert torch.allclose(cast[:, 0], lab_grey[:, 0], atol=1e-3)
    assert torch.allclose(cast[:, 1], torch.full_like(cast[:, 1], 5.0), atol=1e-3)
    assert torch.allclose(cast[:, 2], torch.full_like(cast[:, 2], -3.0), atol=1e-3)
    lighter = rgb_to_lab(aug(grey, params=_lab_params(lab_contrast=0.5, lab_offset=4.0)))
    assert torch.allclose(lighter[:, 0], 50 + (lab_grey[:, 0] - 50) * 0.5 + 4.0, atol=1e-3)
    achromatic = aug(x, params=_lab_params(chroma=0.0))  # chroma 0: greys of the same lightness
    assert torch.allclose(achromatic[:, 0], achromatic[:, 1], atol=1e-4)
    assert torch.allclose(achromatic[:, 1], achromatic[:, 2], atol=1e-4)
    assert torch.allclose(rgb_to_lab(achromatic)[:, 0], rgb_to_lab(ref)[:, 0], atol=1e-2)


def test_lab_draws_keep_the_geometry_draws_and_their_ranges():
    rgb = BatchAugment(64).sample(5000, torch.Generator().manual_seed(1))
    lab = BatchAugment(64, color="lab").sample(5000, torch.Generator().manual_seed(1))
    assert all(torch.equal(rgb[k], lab[k]) for k in rgb)  # the same crops, flips and rotations
    for key, (lo, hi) in BatchAugment.LAB_RANGES.items():
        margin = 0.05 * (hi - lo)
        assert lo <= float(lab[key].min()) < lo + margin and hi - margin < float(lab[key].max()) <= hi
    with pytest.raises(ValueError, match="'rgb' or 'lab'"):
        BatchAugment(64, color="hsv")


def _light_params(**changes) -> dict[str, torch.Tensor]:
    p = {"vignette": 0.0, "light_y": 0.0, "light_x": 0.0, "gradient": 0.0, "light_angle": 0.0}
    p.update(changes)
    return {**_params(), **{k: torch.tensor([v]) for k, v in p.items()}}


def test_illumination_field_is_exact_on_a_grey_image():
    """Pixel centres of a 4-px side are at -0.75, -0.25, 0.25, 0.75: exact gains by hand."""
    grey = torch.full((1, 3, 4, 4), 200, dtype=torch.uint8)
    aug = BatchAugment(4, mean=MEAN, std=STD, illumination="random")
    base = 200 / 255
    assert torch.allclose(aug(grey, params=_light_params()), torch.full((1, 3, 4, 4), base), atol=1e-6)
    # a gradient to the right (angle 0): gain 1 + 0.2 * u / sqrt(2) by column, the same in every row
    # and channel
    right = aug(grey, params=_light_params(gradient=0.2))
    u = torch.tensor([-0.75, -0.25, 0.25, 0.75])
    assert torch.allclose(right, (base * (1 + 0.2 * u / math.sqrt(2))).view(1, 1, 1, 4).expand(1, 3, 4, 4),
                          atol=1e-6)
    down = aug(grey, params=_light_params(gradient=0.2, light_angle=math.pi / 2))  # angle 90 degrees: by row
    assert torch.allclose(down, right.transpose(2, 3), atol=1e-6)
    # a centred vignette of 0.4: gain 1 - 0.4 * (u^2 + v^2) / 2; the four centre pixels (r^2 = 0.0625)
    # are darkened least, the corners (r^2 = 0.5625) most; symmetric
    lens = aug(grey, params=_light_params(vignette=0.4))
    assert torch.allclose(lens[0, :, 1, 1], torch.full((3,), base * (1 - 0.4 * 0.0625)), atol=1e-6)
    assert torch.allclose(lens[0, :, 0, 0], torch.full((3,), base * (1 - 0.4 * 0.5625)), atol=1e-6)
    assert torch.equal(lens, lens.flip(2)) and torch.equal(lens, lens.flip(3))
    # its centre moved right: the right-hand column is now brighter than the left
    shifted = aug(grey, params=_light_params(vignette=0.4, light_x=0.5))
    assert torch.allclose(shifted[0, 0, 0, 3], torch.tensor(base * (1 - 0.4 * (0.25 ** 2 + 0.75 ** 2) / 2)))
    assert float(shifted[0, 0, 0, 3]) > float(shifted[0, 0, 0, 0])
    # light adds no colour (every channel scaled alike) and clips at white
    white = torch.full((1, 3, 4, 4), 250, dtype=torch.uint8)
    bright = aug(white, params=_light_params(gradient=0.3))
    assert float(bright.max()) == 1.0 and torch.allclose(bright[:, 0], bright[:, 1], atol=1e-6)


def test_illumination_draws_come_last_and_cover_their_ranges():
    for augment in ("classic", "strong"):
        plain = BatchAugment(64, augment).sample(5000, torch.Generator().manual_seed(2))
        lit = BatchAugment(64, augment, illumination="random").sample(5000, torch.Generator().manual_seed(2))
        assert all(torch.equal(plain[k], lit[k]) for k in plain)  # the same crops, flips, rotations, colours
    for key, (lo, hi) in BatchAugment.ILLUMINATION_RANGES.items():
        margin = 0.05 * (hi - lo)
        assert lo <= float(lit[key].min()) < lo + margin and hi - margin < float(lit[key].max()) <= hi
    with pytest.raises(ValueError, match="'none' or 'random'"):
        BatchAugment(64, illumination="flash")
    with pytest.raises(ValueError, match="'classic' and 'strong'"):
        BatchAugment(64, "none", illumination="random")


def test_crop_aspect_widens_only_the_aspect_draw():
    def ratios(p):  # w / h is the drawn aspect where neither side was clamped to the whole image
        free = (p["w"] < 1) & (p["h"] < 1)
        return p["w"][free] / p["h"][free]

    for augment, preset_range in (("classic", (0.85, 1.18)), ("strong", (0.75, 1.33))):
        own = BatchAugment(64, augment).sample(20000, torch.Generator().manual_seed(3))
        wide = BatchAugment(64, augment, aspect=4 / 3).sample(20000, torch.Generator().manual_seed(3))
        narrow = BatchAugment(64, augment, aspect=1.05).sample(20000, torch.Generator().manual_seed(3))
        # every other draw (flips, rotation, area, colours) is the one the preset's own range made
        assert all(torch.equal(own[k], wide[k]) for k in own if k not in ("w", "h", "cx", "cy"))
        lo, hi = preset_range
        r = ratios(own)
        assert lo <= float(r.min()) < lo * 1.02 and hi / 1.02 < float(r.max()) <= hi
        for p, a in ((wide, 4 / 3), (narrow, 1.05)):
            r = ratios(p)
            assert 1 / a - 1e-6 <= float(r.min()) < 1.02 / a and a / 1.02 < float(r.max()) <= a + 1e-6
            # log-uniform: as many lesions narrowed as widened
            assert abs(float((r > 1).float().mean()) - 0.5) < 0.03
        # the crop still stays inside the image
        assert bool(((wide["cx"].abs() + wide["w"]) <= 1 + 1e-6).all())
        assert bool(((wide["cy"].abs() + wide["h"]) <= 1 + 1e-6).all())
    for bad in (0.9, 2.5, float("nan")):
        with pytest.raises(ValueError, match="1/A, A"):
            BatchAugment(64, aspect=bad)
    with pytest.raises(ValueError, match="'classic' and 'strong'"):
        BatchAugment(64, "none", aspect=4 / 3)


def test_grayscale_makes_the_drawn_images_their_luminance_after_the_colour_step():
    x = torch.cat([_image(seed=0), _image(seed=1)])
    aug = BatchAugment(8, mean=MEAN, std=STD, grayscale=0.5)
    params = {k: torch.cat([v, v]) for k, v in _params(brightness=1.1).items()}
    out = aug(x, params={**params, "grey": torch.tensor([True, False])})
    bright = (x.float() / 255 * 1.1).clamp(0, 1)  # the colour step comes first, then the grey
    luminance = (bright[0] * torch.tensor([0.2989, 0.587, 0.114]).view(3, 1, 1)).sum(0)
    assert torch.allclose(out[0], luminance.expand(3, 8, 8), atol=1e-5)  # every channel the luminance
    assert torch.allclose(out[1], bright[1], atol=1e-5)  # the other image keeps its colours
    plain = BatchAugment(64).sample(20000, torch.Generator().manual_seed(4))
    drawn = BatchAugment(64, grayscale=0.2).sample(20000, torch.Generator().manual_seed(4))
    assert all(torch.equal(plain[k], drawn[k]) for k in plain)  # drawn last: every other draw unchanged
    assert abs(float(drawn["grey"].float().mean()) - 0.2) < 0.01
    assert "grey" not in plain  # 0: no draw and no change
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="probability"):
            BatchAugment(64, grayscale=bad)
    with pytest.raises(ValueError, match="'classic' and 'strong'"):
        BatchAugment(64, "none", grayscale=0.2)


def test_a_crop_of_aspect_r_makes_a_lesion_1_over_r_as_wide_for_its_height():
    # a square 8 px lesion in a 16 px image; a crop of 3/4 of the width and the whole height (aspect
    # r = 0.75) resized to 12 px keeps its 8 px width and brings its height to 8 * 12/16 = 6 px:
    # 4/3 as wide as tall, the squash of a 4:3 photograph copied to a square, undone
    x = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    x[..., 4:12, 4:12] = 255
    out = BatchAugment(12, mean=MEAN, std=STD)(x, params=_params(w=0.75, h=1.0))[0, 0]
    expected = torch.zeros(12, 12)
    expected[3:9, 2:10] = 1
    assert torch.allclose(out, expected, atol=1e-5)


def _strong_params(**changes) -> dict[str, torch.Tensor]:
    p = {"zoom": 1.0, "sharpness": 1.0, "sigma": 0.0, "radius": 0.0, "shift_y": 0.0, "shift_x": 0.0}
    p.update(changes)
    return {**_params(), **{k: torch.tensor([v]) for k, v in p.items()}}


def test_strong_identity_parameters_leave_the_image_as_it_is():
    x = _image()
    out = BatchAugment(8, "strong", mean=MEAN, std=STD)(x, params=_strong_params())
    assert torch.allclose(out, x.float() / 255, atol=1e-5)


def test_strong_zoom_out_mirrors_the_border_and_rotation_corners_are_black():
    x = _image(4)
    ref = x.float() / 255
    aug = BatchAugment(4, "strong", mean=MEAN, std=STD)
    # zoom 3 on a 4 px image: pixel centres -0.75, -0.25, 0.25, 0.75 -> -2.25, -0.75, 0.75, 2.25, which
    # the mirrored border folds to 0.25, -0.75, 0.75, -0.25: pixels 2, 0, 3, 1
    zoomed = aug(x, params=_strong_params(zoom=3.0))
    order = [2, 0, 3, 1]
    assert torch.allclose(zoomed, ref[..., order, :][..., order], atol=1e-5)
    rotated = BatchAugment(8, "strong", mean=MEAN, std=STD)(_image(8), params=_strong_params(angle=math.pi / 4))
    assert float(rotated[..., 0, 0].abs().max()) == 0.0 and float(rotated[..., -1, -1].abs().max()) == 0.0
    assert float(rotated[..., 3:5, 3:5].min()) > 0.0  # the centre keeps its pixels


def test_strong_sharpness_blur_and_field_of_view_match_the_per_image_transforms():
    from torchvision.transforms.v2 import functional as TF

    from melanogan.data.batch_augment import gaussian_blur, microscope_mask, sharpen

    x = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    sharp = sharpen(x, torch.tensor([2.0, 1.0]))
    assert torch.allclose(sharp[0], TF.adjust_sharpness(x[0], 2.0), atol=1e-6) and torch.equal(sharp[1], x[1])
    blurred = gaussian_blur(x, torch.tensor([0.7, 0.0]))
    assert torch.allclose(blurred[0], TF.gaussian_blur(x[0], [5, 5], [0.7, 0.7]), atol=1e-6)
    assert torch.equal(blurred[1], x[1])
    # RandomMicroscope's mask: r = 0.5 * 20 px, centre 9.5: (r - distance) / (0.02 * 20) + 0.5, clamped
    mask = microscope_mask(2, 20, torch.tensor([0.5, 0.0]), torch.zeros(2), torch.tensor([0.05, 0.0]))
    yy, xx = torch.meshgrid(torch.arange(20.0), torch.arange(20.0), indexing="ij")
    expected = ((10 - torch.sqrt((yy - 9.5) ** 2 + (xx - 10.5) ** 2)) / 0.4 + 0.5).clamp(0, 1)
    assert torch.allclose(mask[0, 0], expected, atol=1e-5) and torch.equal(mask[1], torch.ones(1, 20, 20))


def test_strong_draws_follow_the_per_image_preset():
    p = BatchAugment(64, "strong").sample(20000, torch.Generator().manual_seed(0))
    area = p["w"] * p["h"]
    assert 0.35 - 1e-6 <= float(area.min()) < 0.37 and float(area.max()) <= 1.0 + 1e-6
    zoomed = p["zoom"] > 1
    assert abs(float(zoomed.float().mean()) - 0.5) < 0.02 and float(p["zoom"].max()) <= 1.6
    assert abs(float((p["sharpness"] == 2).float().mean()) - 0.3) < 0.02
    assert abs(float((p["sigma"] > 0).float().mean()) - 0.2) < 0.02 and float(p["sigma"].max()) <= 1.5
    scoped = p["radius"] > 0
    assert abs(float(scoped.float().mean()) - 0.4) < 0.02
    assert float(p["radius"][scoped].min()) >= 0.5 and float(p["radius"].max()) <= 0.72
    assert 0.7 <= float(p["brightness"].min()) < 0.71 and 1.29 < float(p["brightness"].max()) <= 1.3
    with pytest.raises(ValueError, match="classic preset"):
        BatchAugment(64, "strong", color="lab")
