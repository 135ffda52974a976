"""The embedded demo data: layout, imbalance, determinism, and that the classes differ as intended."""

from __future__ import annotations

import numpy as np
import pandas as pd

from melanogan.data.demo import generate_demo_dataset, render_phantom


def test_layout_rate_and_patients(tmp_path):
    table = generate_demo_dataset(tmp_path, n_images=40, melanoma_rate=0.25, seed=3, width=64, height=48)
    csv = pd.read_csv(tmp_path / "train.csv")
    assert list(csv.columns[:3]) == ["image_name", "patient_id", "sex"]
    assert csv["target"].sum() == 10 and len(csv) == 40
    assert csv["patient_id"].nunique() < 40  # several lesions per patient
    assert all((tmp_path / "jpeg" / "train" / f"{n}.jpg").is_file() for n in table.image_name)


def test_deterministic_for_a_seed(tmp_path):
    generate_demo_dataset(tmp_path / "a", n_images=12, seed=5, width=64, height=48)
    generate_demo_dataset(tmp_path / "b", n_images=12, seed=5, width=64, height=48)
    generate_demo_dataset(tmp_path / "c", n_images=12, seed=6, width=64, height=48)
    a = (tmp_path / "a" / "jpeg" / "train" / "ISIC_9000003.jpg").read_bytes()
    assert a == (tmp_path / "b" / "jpeg" / "train" / "ISIC_9000003.jpg").read_bytes()
    assert a != (tmp_path / "c" / "jpeg" / "train" / "ISIC_9000003.jpg").read_bytes()


def test_melanoma_phantoms_are_larger_and_more_colourful():
    def lesion_stats(melanoma: bool) -> tuple[float, float]:
        areas, spreads = [], []
        for i in range(40):
            img = render_phantom(np.random.default_rng(i), melanoma, 128, 128).astype(float)
            centre = img[24:104, 24:104]
            lum = centre.mean(axis=2)
            dark = lum < 0.75 * np.percentile(lum, 95)  # darker than this image's skin
            areas.append(dark.mean())
            spreads.append(centre[dark].std(axis=0).mean() if dark.any() else 0.0)
        return float(np.mean(areas)), float(np.mean(spreads))

    mel_area, mel_spread = lesion_stats(True)
    ben_area, ben_spread = lesion_stats(False)
    assert mel_area > 1.15 * ben_area  # severities overlap on purpose: the task is not trivial
    assert mel_spread > ben_spread
