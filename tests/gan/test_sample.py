"""generate: images + manifest in the real schema, provenance, determinism, train split only."""

from __future__ import annotations

import pandas as pd
import pytest

from melanogan.data.audit import audit_manifest
from melanogan.data.dataset import CachedImageDataset
from melanogan.data.manifest import MANIFEST_COLUMNS
from melanogan.errors import MelanoganError
from melanogan.gan.sample import generate
from melanogan.gan.train import train_gan


@pytest.fixture(scope="module")
def gan_run(demo_prepared, tmp_path_factory):
    from melanogan.gan.config import load_config

    cfg = load_config("default", resolution=32, generator_channels=32, critic_channels=8, batch_size=8, n_critic=1,
                      steps=2, checkpoint_every=2, sample_every=2, log_every=1)
    run = tmp_path_factory.mktemp("gan") / "run"
    train_gan(demo_prepared, run, cfg, progress=False)
    return run


def test_generate_writes_a_consumable_synthetic_manifest(gan_run, demo_prepared, tmp_path):
    out = tmp_path / "syn"
    m = generate(gan_run, 10, "melanoma", out, seed=3, batch_size=4)
    assert list(m.columns[: len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS
    assert (m["split"] == "train").all() and (m["source"] == "synthetic").all() and (m["label"] == 1).all()
    assert m["checkpoint_hash"].nunique() == 1 and m["checkpoint_step"].iloc[0] == 2
    assert m["noise_index"].tolist() == list(range(10))
    ds = CachedImageDataset(out, "train", image_size=32)
    assert len(ds) == 10 and ds[0][0].shape == (3, 32, 32)
    assert ds.cache.options.size == 64  # the real data's cache size and options
    generate(gan_run, 4, "other", out, seed=3)
    both = pd.read_parquet(out / "manifest.parquet")
    assert sorted(both["label"].value_counts().to_dict().items()) == [(0, 4), (1, 10)]
    assert audit_manifest(both).passed


def test_generation_is_deterministic_and_independent_of_batching(gan_run, tmp_path):
    a = generate(gan_run, 6, "melanoma", tmp_path / "a", seed=1, batch_size=6)
    b = generate(gan_run, 6, "melanoma", tmp_path / "b", seed=1, batch_size=4)
    c = generate(gan_run, 6, "melanoma", tmp_path / "c", seed=2)
    assert a["content_hash"].tolist() == b["content_hash"].tolist()
    assert set(a["content_hash"]).isdisjoint(c["content_hash"])


def test_generate_errors(gan_run, tmp_path):
    with pytest.raises(MelanoganError, match="no GAN checkpoint"):
        generate(tmp_path / "empty", 3, "melanoma", tmp_path / "o")
    with pytest.raises(MelanoganError, match="--label 'nevus'"):
        generate(gan_run, 3, "nevus", tmp_path / "o")
    with pytest.raises(MelanoganError, match="--n must be positive"):
        generate(gan_run, 0, "melanoma", tmp_path / "o")


def test_synthetic_images_are_not_colour_corrected_twice_and_stay_with_their_preprocessing(
        gan_run, demo_prepared, demo_prepared_skin_colour, tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from melanogan.classify.train import TrainConfig, train_classifier
    from melanogan.data.manifest import default_cache

    real_options = default_cache(demo_prepared).options
    assert real_options.color_constancy  # the GAN learned colour-constant pixels
    out = tmp_path / "syn"
    generate(gan_run, 4, "melanoma", out, seed=0)
    ds = CachedImageDataset(out, "train")
    for i in range(len(ds)):  # cached exactly as generated (same size): nothing applied a second time
        png = np.asarray(Image.open(ds.rows["path"].iat[i]).convert("RGB"))
        assert np.array_equal(ds.raw(i).permute(1, 2, 0).numpy(), png)
    info = json.loads((out / "prepare.json").read_text())
    assert info["cache_options"] == real_options.to_dict() and not info["decode_options"]["color_constancy"]
    cfg = TrainConfig(model="small-cnn", image_size=32, epochs=1, batch_size=8, workers=0, synthetic=[str(out)])
    with pytest.raises(MelanoganError, match="generated for data preprocessed as"):  # other data, other options
        train_classifier(demo_prepared_skin_colour, tmp_path / "run", cfg, progress=False)
    info.pop("synthetic_format")  # a SYN_DIR of an older melanogan (colour-corrected twice)
    (out / "prepare.json").write_text(json.dumps(info))
    with pytest.raises(MelanoganError, match="older melanogan"):
        train_classifier(demo_prepared, tmp_path / "run2", cfg, progress=False)


def test_synthetic_images_take_the_resolution_path_real_training_images_take(gan_run, tmp_path):
    """generate upsamples generator output with the very function `GeneratorResolution` applies to
    real training images (study `resolution: matched`)."""
    import numpy as np
    import torch

    from melanogan.data.transforms import bicubic_upsample
    from melanogan.gan.checkpoint import latest_checkpoint, load_checkpoint
    from melanogan.gan.sample import noise_for

    generate(gan_run, 3, "melanoma", tmp_path / "syn", seed=5, use_ema=False)
    loaded = load_checkpoint(latest_checkpoint(gan_run))
    cfg, generator = loaded["config"], loaded["generator"].eval()
    ds = CachedImageDataset(tmp_path / "syn", "train")
    with torch.no_grad():
        z = torch.stack([noise_for(i, 5, cfg.noise_dim) for i in range(3)])
        out = generator(z, torch.ones(3, dtype=torch.long)).float().clamp(-1, 1).add(1).mul(127.5).round().byte()
    for i in range(3):
        expected = np.asarray(bicubic_upsample(out[i].permute(1, 2, 0).numpy(), ds.cache.options.size))
        assert np.array_equal(ds.raw(i).permute(1, 2, 0).numpy(), expected)


def test_a_gan_trained_on_a_pack_generates_for_the_original_data(demo_prepared, tmp_path):
    """Trained on a 32 px pack of the 64 px demo cache (as on a GPU machine), then moved: its images
    are cached at 64 px, the data it stands for, not at the pack's size, even where the pack is gone."""
    import shutil

    from melanogan.data.pack import pack_data_dir, unpack_data_dir
    from melanogan.data.synthetic import check_synthetic_space
    from melanogan.gan.config import load_config

    pack_data_dir(demo_prepared, tmp_path / "pack", size=32)
    data = unpack_data_dir(tmp_path / "pack", tmp_path / "elsewhere")
    cfg = load_config("default", resolution=32, generator_channels=32, critic_channels=8, batch_size=8, n_critic=1,
                      steps=2, checkpoint_every=2, sample_every=2, log_every=1)
    train_gan(data, tmp_path / "run", cfg, progress=False)
    shutil.rmtree(tmp_path / "elsewhere")
    generate(tmp_path / "run", 4, "melanoma", tmp_path / "syn")
    options = CachedImageDataset(tmp_path / "syn", "train").cache.options
    assert options.size == 64
    from melanogan.data.manifest import default_cache

    check_synthetic_space(tmp_path / "syn", default_cache(demo_prepared).options)  # accepted for the real data


def test_ema_warmup_and_initial_share_exact_values():
    from melanogan.gan.train import ema_decay_at, ema_initial_share

    assert ema_decay_at(0.999, 0) == pytest.approx(0.1) and ema_decay_at(0.999, 8990) == pytest.approx(0.999)
    assert ema_decay_at(0.999, 100) == pytest.approx(101 / 110)
    assert ema_initial_share(0.999, 1000, warmup=False) == pytest.approx(0.999 ** 1000)  # 0.368
    # with warm-up the product telescopes: prod (1+t)/(10+t) over t < T = 9! / ((T+1)...(T+9))
    import math

    assert ema_initial_share(0.999, 20) == pytest.approx(math.factorial(9) * math.factorial(20) / math.factorial(29))


def test_an_ema_generator_that_still_holds_its_random_start_is_not_used():
    from types import SimpleNamespace

    from melanogan.gan.sample import choose_generator

    raw, ema = object(), object()

    def loaded(decay, step, warmup):
        return {"config": SimpleNamespace(ema_decay=decay), "generator": raw, "generator_ema": ema, "step": step,
                "state": {"ema_warmup": True} if warmup else {}}

    model, note = choose_generator(loaded(0.999, 1000, False))  # the #12 GPU run: 37% initial weights
    assert model is raw and "37%" in note
    assert choose_generator(loaded(0.995, 1500, False)) == (ema, "ema")  # the CPU run: 0.05%
    assert choose_generator(loaded(0.999, 1000, True)) == (ema, "ema")  # warmed up
    assert choose_generator(loaded(0.999, 1000, True), use_ema=False) == (raw, "raw")
