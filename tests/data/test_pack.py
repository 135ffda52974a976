"""pack/unpack: a DATA_DIR shrunk for a GPU machine gives the GAN what it would have seen, keeps the
manifest (and its hash), records the preprocessing it stands for, and refuses a damaged copy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from melanogan.data.cache import CacheOptions
from melanogan.data.manifest import default_cache, load_manifest, manifest_hash
from melanogan.data.pack import data_space, pack_data_dir, resize_like_preset, unpack_data_dir
from melanogan.errors import DataError
from melanogan.fileio import read_json


@pytest.fixture(scope="module")
def unpacked(demo_prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    info = pack_data_dir(demo_prepared, root / "pack", size=32, quality=100)
    return info, unpack_data_dir(root / "pack", root / "data")


def test_resize_matches_the_gan_input_preset_exactly():
    from melanogan.data.transforms import eval_preset

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    expected = eval_preset(32, "none")(torch.from_numpy(pixels).permute(2, 0, 1))  # floats in [0, 1]
    got = torch.from_numpy(resize_like_preset(pixels, 32)).permute(2, 0, 1)
    assert torch.equal(got, (expected * 255).round().to(torch.uint8))


def test_the_gan_sees_the_same_training_batches_up_to_jpeg(demo_prepared, unpacked):
    from melanogan.gan.config import load_config
    from melanogan.gan.train import BatchSource

    _, data = unpacked
    cfg = load_config("default", resolution=32)
    original, packed = BatchSource(demo_prepared, cfg), BatchSource(data, cfg)
    assert original.counts == packed.counts
    a, la = original.batch(16, seed=5)
    b, lb = packed.batch(16, seed=5)
    assert torch.equal(la, lb)
    # JPEG at quality 100 with 4:4:4: about one grey level (2/255 in tanh units); another image
    # or a different resize would be tens of levels off.
    assert float((a - b).abs().mean()) < 1.5 * 2 / 255


def test_manifest_hash_and_preprocessing_travel(demo_prepared, unpacked):
    info, data = unpacked
    assert manifest_hash(load_manifest(data)) == manifest_hash(load_manifest(demo_prepared)) == info["manifest_hash"]
    original = default_cache(demo_prepared).options
    assert default_cache(data).options == CacheOptions(**{**original.to_dict(), "size": 32})
    assert data_space(data) == original and data_space(demo_prepared) == original  # what generated images are for
    prepared = read_json(data / "prepare.json")
    assert prepared["packed"]["jpeg_quality"] == 100 and "lossy copy" in prepared["notes"][-1]


def test_bad_requests_and_damaged_packs_are_refused(demo_prepared, unpacked, tmp_path):
    with pytest.raises(DataError, match="only upsample"):
        pack_data_dir(demo_prepared, tmp_path / "p", size=128)  # the demo cache is 64 px
    with pytest.raises(DataError, match="quality"):
        pack_data_dir(demo_prepared, tmp_path / "p", quality=10)
    with pytest.raises(DataError, match="not a complete melanogan pack"):
        unpack_data_dir(tmp_path / "nothing", tmp_path / "d")
    pack = tmp_path / "edited"
    pack_data_dir(demo_prepared, pack, size=32)
    manifest = pd.read_parquet(pack / "manifest.parquet")
    manifest.loc[0, "label"] = 1 - manifest.loc[0, "label"]
    manifest.to_parquet(pack / "manifest.parquet")
    with pytest.raises(DataError, match="does not match"):
        unpack_data_dir(pack, tmp_path / "d")
