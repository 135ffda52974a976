"""import-synthetic: images from another generator become a SYN_DIR like `generate`'s; evaluate-gan
names planted training copies; unreadable files are listed, not fatal."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from melanogan.data.manifest import load_manifest
from melanogan.data.synthetic import check_synthetic_space, import_synthetic
from melanogan.errors import MelanoganError


def test_imported_planted_copies_are_named_by_evaluate_gan(demo_prepared, tmp_path):
    from melanogan.classify.train import TrainConfig, build_datasets
    from melanogan.data.manifest import default_cache
    from melanogan.gan.evaluate import evaluate_gan

    real = load_manifest(demo_prepared)
    train_mel = real[(real["split"] == "train") & (real["label"] == 1)]
    folder = tmp_path / "stylegan-out"
    (folder / "batch1").mkdir(parents=True)
    planted = []
    for k in range(3):  # a "generator" that copies training melanomas
        name = f"copy{k}.jpg"
        shutil.copy(train_mel["path"].iat[k], folder / "batch1" / name)
        planted.append(name)
    for k in range(3):  # and some images like no training image
        noise = np.random.default_rng(k).integers(0, 256, (80, 96, 3), dtype=np.uint8)
        Image.fromarray(noise).save(folder / f"novel{k}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")

    manifest = import_synthetic(folder, "melanoma", tmp_path / "syn", demo_prepared)
    assert len(manifest) == 6 and manifest.attrs["rejected"] == 1
    assert (manifest["split"] == "train").all() and (manifest["source"] == "synthetic").all()
    assert set(manifest["generator"]) == {"imported:stylegan-out"}
    rejected = (tmp_path / "syn" / "rejected.csv").read_text()
    assert "broken.jpg" in rejected and "not-an-image" in rejected
    check_synthetic_space(tmp_path / "syn", default_cache(demo_prepared).options)  # train --synthetic takes it
    train, _, _ = build_datasets(demo_prepared, TrainConfig(synthetic=[str(tmp_path / "syn")], image_size=32))
    assert len(train.datasets) == 2 and len(train.datasets[1]) == 6

    result = evaluate_gan(tmp_path / "syn", demo_prepared, tmp_path / "q", features=["pixels"], n_pairs=5)
    flagged = {f["synthetic"].rsplit("/", 1)[-1] for f in result["classes"]["melanoma"]["memorisation"]["flagged"]}
    assert flagged == set(planted)


def test_import_errors(demo_prepared, tmp_path):
    with pytest.raises(MelanoganError, match="--label 'nevus'"):
        import_synthetic(tmp_path, "nevus", tmp_path / "o", demo_prepared)
    with pytest.raises(MelanoganError, match="no image files"):
        import_synthetic(tmp_path, "melanoma", tmp_path / "o", demo_prepared)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"junk")
    with pytest.raises(MelanoganError, match="none of the 1 image"):
        import_synthetic(tmp_path / "bad", "melanoma", tmp_path / "o", demo_prepared)


def test_generated_images_are_not_normalised_a_second_time():
    """A GAN learned pixels already colour-constant and exposure-normalised: caching its images applies
    neither again (a second pass would move them off the real data's space), and keeps everything else."""
    from melanogan.data.cache import CacheOptions
    from melanogan.data.synthetic import synthetic_decode_options

    space = CacheOptions(size=128, resize_mode="squash", color_constancy=True, white_level=180, hair_removal=True,
                         clahe=2.0)
    assert synthetic_decode_options(space) == CacheOptions(size=128, resize_mode="squash", color_constancy=False,
                                                           white_level=0)
