"""A trained run and a new site's labelled sample, shared by the site tests (calibrate, site head)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def run_and_site(demo_raw, tmp_path):
    """make(n, brightness, seed) -> (RUN_DIR, SITE_DATA_DIR): the default small CNN trained 2 epochs on
    the demo data at 32 px, and a prepared site of n phantom images (a quarter melanoma) whose pixels
    are scaled by `brightness` (a darker dermoscope), its raw images under tmp_path/site/<class>/."""
    from PIL import Image

    from melanogan.classify.train import TrainConfig, train_classifier
    from melanogan.data.cache import CacheOptions
    from melanogan.data.demo import render_phantom
    from melanogan.data.manifest import prepare

    def make(n: int, brightness: float, seed: int) -> tuple[Path, Path]:
        prepare([("siim-isic-2020", demo_raw)], tmp_path / "own", CacheOptions(size=32), seed=0)
        cfg = TrainConfig(model="small-cnn", image_size=32, epochs=2, batch_size=8, workers=0)
        train_classifier(tmp_path / "own", tmp_path / "run", cfg, progress=False)
        rng = np.random.default_rng(seed)
        for k in range(n):
            cls = "melanoma" if k % 4 == 0 else "nevus"
            (tmp_path / "site" / cls).mkdir(parents=True, exist_ok=True)
            img = (render_phantom(rng, cls == "melanoma", 96, 80) * brightness).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "site" / cls / f"{k}.jpg")
        prepare([("folder", tmp_path / "site")], tmp_path / "sitedata", CacheOptions(size=48), seed=0)
        return tmp_path / "run", tmp_path / "sitedata"

    return make
