"""Procedural dermoscopy-like phantoms in the SIIM-ISIC 2020 layout, so the whole pipeline runs
anywhere without downloading a dataset.

Benign phantoms are small, round, symmetric, evenly brown with a regular pigment network.
Melanoma phantoms follow the ABCD rule: Asymmetric, irregular Border, several Colours (dark brown,
black, red, blue-white veil), larger Diameter. Patients have several lesions; some images have hairs;
all have skin texture and the dark vignette of a dermoscope. Deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from melanogan.fileio import atomic_path, write_csv

SKIN_TONES = np.array([[233, 190, 160], [222, 170, 135], [198, 145, 110], [170, 115, 85], [240, 205, 180]], float)
SITES = ["torso", "lower extremity", "upper extremity", "head/neck", "palms/soles", "oral/genital"]


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    small = rng.standard_normal((max(2, int(h / scale)), max(2, int(w / scale)))).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _lesion_mask(rng: np.random.Generator, h: int, w: int, radius: float, severity: float) -> np.ndarray:
    """A filled blob: a near-circle at severity 0, a lumpy asymmetric shape as severity grows."""
    cy = h / 2 + rng.normal(0, h * 0.04)
    cx = w / 2 + rng.normal(0, w * 0.04)
    angles = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    r = np.ones_like(angles)
    for k in range(2, 9):  # irregular border: harmonics with random phases
        r += severity * rng.uniform(0.04, 0.16) / (k / 2) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
    r *= 1 + severity * 0.25 * np.cos(angles - rng.uniform(0, 2 * np.pi))  # asymmetry: one side bulges
    r += severity * rng.normal(0, 0.03, angles.shape)
    aspect = rng.uniform(1.0 - 0.3 * severity - 0.1, 1.0)
    theta = rng.uniform(0, np.pi)
    xs = radius * r * np.cos(angles)
    ys = radius * r * aspect * np.sin(angles)
    pts = np.column_stack([cx + xs * np.cos(theta) - ys * np.sin(theta), cy + xs * np.sin(theta) + ys * np.cos(theta)])
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 255)
    return mask


def _pigment_network(rng: np.random.Generator, h: int, w: int, cell: float, irregular: bool) -> np.ndarray:
    """Honeycomb-like dark lines; atypical (irregular, thick, broken) for melanoma."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    warp = 3.0 if irregular else 1.0
    xx = xx + warp * cell * 0.3 * _smooth_noise(rng, h, w, cell * 2)
    yy = yy + warp * cell * 0.3 * _smooth_noise(rng, h, w, cell * 2)
    lines = np.abs(np.sin(np.pi * xx / cell)) * np.abs(np.sin(np.pi * yy / cell))
    net = 1 - np.clip(lines * (2.0 if irregular else 3.0), 0, 1)
    if irregular:
        net *= _smooth_noise(rng, h, w, cell * 3) > -0.2  # broken network
    return net.astype(np.float32)


def _hair(rng: np.random.Generator, img: np.ndarray, n: int) -> None:
    h, w = img.shape[:2]
    for _ in range(n):
        p0 = rng.uniform(0, 1, 2) * [w, h]
        direction = rng.normal(0, 1, 2)
        direction /= np.linalg.norm(direction) + 1e-9
        length = rng.uniform(0.4, 1.2) * max(h, w)
        bend = rng.normal(0, 0.15 * length, 2)
        t = np.linspace(0, 1, 40)[:, None]
        pts = p0 + direction * length * t + bend * (t * (1 - t) * 4)
        colour = tuple(float(c) for c in rng.uniform(20, 60, 3))
        cv2.polylines(img, [np.round(pts).astype(np.int32)], False, colour, thickness=int(rng.integers(1, 3)),
                      lineType=cv2.LINE_AA)


def render_phantom(rng: np.random.Generator, melanoma: bool, width: int = 320, height: int = 256,
                   hair: bool = False) -> np.ndarray:
    """One RGB uint8 dermoscopy-like image."""
    h, w = height, width
    skin = SKIN_TONES[rng.integers(len(SKIN_TONES))] + rng.normal(0, 6, 3)
    img = np.ones((h, w, 3), np.float32) * skin
    img += (8 * _smooth_noise(rng, h, w, 24))[..., None] + (4 * _smooth_noise(rng, h, w, 4))[..., None]
    # Severity overlaps between classes (atypical naevi, early melanomas) so the task is not trivial.
    severity = rng.uniform(0.15, 0.9) if melanoma else rng.uniform(0.0, 0.6)
    radius = min(h, w) * (0.14 + 0.22 * severity + rng.uniform(-0.03, 0.05))
    mask = _lesion_mask(rng, h, w, radius, severity).astype(np.float32) / 255
    soft = cv2.GaussianBlur(mask, (0, 0), sigmaX=radius * (0.04 if melanoma else 0.12))
    brown = np.array([120, 72, 45], float) * rng.uniform(0.8, 1.15)
    lesion = np.ones((h, w, 3), np.float32) * brown
    net = _pigment_network(rng, h, w, cell=rng.uniform(6, 10), irregular=severity > 0.5)
    lesion *= (1 - 0.45 * net)[..., None]
    if melanoma or rng.uniform() < 0.35:
        colours = [np.array([35, 25, 25]), np.array([150, 60, 55]), np.array([110, 125, 160]),
                   np.array([70, 40, 30])]
        n_colours = 1 + int(rng.integers(0, 4) * severity + 0.5) if melanoma else 1
        for colour in rng.permutation(len(colours))[:n_colours]:
            blob = (_smooth_noise(rng, h, w, radius / 2) > rng.uniform(0.5, 1.1)).astype(np.float32)
            blob = cv2.GaussianBlur(blob, (0, 0), sigmaX=3) * mask
            lesion = lesion * (1 - blob[..., None]) + colours[colour] * blob[..., None]
        # Some benign lesions show a little veil or dots too (as regression structures do in real life).
        veil_level = 1.7 - severity if melanoma else 1.6
        veil = cv2.GaussianBlur((_smooth_noise(rng, h, w, radius / 3) > veil_level).astype(np.float32), (0, 0), 6)
        veil *= mask
        lesion = lesion * (1 - 0.6 * veil[..., None]) + np.array([185, 195, 215]) * 0.6 * veil[..., None]
        dot_rate = 0.003 * severity if melanoma else 0.0015 * (rng.uniform() < 0.4)
        dots = (rng.uniform(0, 1, (h, w)) > (1 - 0.001 - dot_rate)).astype(np.float32)
        lesion -= 80 * cv2.dilate(dots, np.ones((3, 3)))[..., None] * mask[..., None]
    else:
        lesion *= 1 + 0.05 * _smooth_noise(rng, h, w, radius)[..., None]
    img = img * (1 - soft[..., None]) + lesion * soft[..., None]
    if hair:
        _hair(rng, img, int(rng.integers(2, 9)))
    yy, xx = np.mgrid[0:h, 0:w]
    dist = np.sqrt(((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2)
    vignette = np.clip(1.25 - 0.45 * dist**2, 0, 1) * (dist < rng.uniform(1.05, 1.3))
    img *= vignette[..., None]
    img += rng.normal(0, 2.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def generate_demo_dataset(out: Path, n_images: int = 400, melanoma_rate: float = 0.10, seed: int = 0,
                          width: int = 320, height: int = 256, hair_rate: float = 0.3) -> pd.DataFrame:
    """Write `train.csv` + `jpeg/train/*.jpg` (SIIM-ISIC 2020 layout) and return the table.

    Each patient has 1-5 lesion images; the melanoma count is exactly round(n_images * melanoma_rate)."""
    if not 0 < melanoma_rate < 1:
        raise ValueError(f"melanoma_rate must be in (0, 1), got {melanoma_rate}")
    if n_images < 10:
        raise ValueError(f"n_images must be at least 10, got {n_images}")
    out = Path(out)
    image_dir = out / "jpeg" / "train"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_mel = max(1, round(n_images * melanoma_rate))
    labels = np.array([1] * n_mel + [0] * (n_images - n_mel))
    rng.shuffle(labels)
    rows, patient, left = [], 0, 0
    sex = age = None
    for i, label in enumerate(labels):
        if left == 0:
            patient += 1
            left = int(rng.integers(1, 6))
            sex = str(rng.choice(["male", "female"]))
            age = float(rng.integers(4, 18) * 5)
        left -= 1
        name = f"ISIC_{9000000 + i:07d}"
        img = render_phantom(np.random.default_rng([seed, i]), bool(label), width, height,
                             hair=bool(rng.uniform() < hair_rate))
        with atomic_path(image_dir / f"{name}.jpg", suffix=".jpg") as tmp:
            cv2.imwrite(str(tmp), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
        rows.append({"image_name": name, "patient_id": f"IP_{patient:07d}", "sex": sex, "age_approx": age,
                     "anatom_site_general_challenge": str(rng.choice(SITES)),
                     "diagnosis": "melanoma" if label else str(rng.choice(["nevus", "unknown"], p=[0.3, 0.7])),
                     "benign_malignant": "malignant" if label else "benign", "target": int(label)})
    table = pd.DataFrame(rows)
    write_csv(out / "train.csv", table)
    return table
