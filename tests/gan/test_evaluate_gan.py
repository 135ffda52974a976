"""evaluate-gan end to end at toy size; feature extractors: local Inception file, offline error."""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

from melanogan.errors import MelanoganError
from melanogan.gan.evaluate import evaluate_gan, label_effect_of
from melanogan.gan.features import create_extractor, dataset_features
from melanogan.gan.sample import generate
from melanogan.gan.train import train_gan


@pytest.fixture(scope="module")
def syn_dir(demo_prepared, tmp_path_factory):
    from melanogan.gan.config import load_config

    cfg = load_config("default", resolution=32, generator_channels=32, critic_channels=8, batch_size=8, n_critic=1,
                      steps=2, checkpoint_every=2, sample_every=2, log_every=1)
    root = tmp_path_factory.mktemp("q")
    train_gan(demo_prepared, root / "run", cfg, progress=False)
    generate(root / "run", 16, "melanoma", root / "syn", seed=0)
    return root / "syn"


def test_quality_report(syn_dir, demo_prepared, tmp_path):
    result = evaluate_gan(syn_dir, demo_prepared, tmp_path / "q", features=["pixels"], n_pairs=20)
    mel = result["classes"]["melanoma"]
    scores = mel["by_extractor"]["pixels"]
    assert scores["n_synthetic"] == 16 and scores["input_size"] == 32 and scores["resize"] == "area"
    val_mel = [r for r in _manifest_rows(demo_prepared) if r["split"] == "val" and r["label"] == 1]
    assert result["real_split"] == "val" and scores["n_real"] == len(val_mel)  # images the GAN never saw
    saved = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert saved["summary"] == result["summary"]
    page = (tmp_path / "q" / "quality.html").read_text()
    assert "data:image/png;base64," in page and "what it means" in page
    assert list((demo_prepared / "features").glob("*.npz"))  # real features cached
    assert "label_effect" not in result  # one class: no noise twins to compare


def _manifest_rows(data_dir) -> list[dict]:
    from melanogan.data.manifest import load_manifest

    return load_manifest(data_dir).to_dict("records")


def test_a_synthetic_set_identical_to_the_reference_scores_as_identical(demo_prepared, tmp_path):
    import shutil

    from melanogan.data.cache import CacheOptions
    from melanogan.data.manifest import load_manifest, prepare
    from melanogan.fileio import write_parquet

    val_mel = [r for r in _manifest_rows(demo_prepared) if r["split"] == "val" and r["label"] == 1]
    src = tmp_path / "fake" / "melanoma"
    src.mkdir(parents=True)
    for r in val_mel:
        shutil.copy(r["path"], src / r["path"].rsplit("/", 1)[-1])
    (tmp_path / "fake" / "other").mkdir()
    shutil.copy(next(r["path"] for r in _manifest_rows(demo_prepared) if r["label"] == 0), tmp_path / "fake" / "other")
    prepare([("folder", tmp_path / "fake")], tmp_path / "fakedata", CacheOptions(size=64), SplitAll(), seed=0)
    m = load_manifest(tmp_path / "fakedata").assign(split="train", source="synthetic")
    write_parquet(tmp_path / "fakedata" / "manifest.parquet", m[m["label"] == 1])
    result = evaluate_gan(tmp_path / "fakedata", demo_prepared, tmp_path / "q", features=["pixels"], n_pairs=5)
    scores = result["classes"]["melanoma"]["by_extractor"]["pixels"]
    assert scores["n_real"] == scores["n_synthetic"] == len(val_mel)
    assert scores["fid"] == pytest.approx(0.0, abs=1e-6)
    tone = result["classes"]["melanoma"]["skin_tone"]  # the same images: the same skin tones
    assert tone["n_real"] + tone["n_real_unknown"] == len(val_mel) and tone["n_real"] > 0
    assert tone["ks_statistic"] == 0.0 and tone["median_real"] == tone["median_synthetic"]


def test_memorised_copies_are_flagged(demo_prepared, tmp_path):
    """A 'synthetic' set made of training images (one exact, one lightly noised) and a new image."""
    import shutil

    import numpy as np
    from PIL import Image

    from melanogan.data.cache import CacheOptions
    from melanogan.data.manifest import load_manifest, prepare

    real = load_manifest(demo_prepared)
    train_mel = real[(real["split"] == "train") & (real["label"] == 1)]
    src = tmp_path / "fake" / "melanoma"
    src.mkdir(parents=True)
    shutil.copy(train_mel["path"].iat[0], src / "copy.jpg")
    noisy = np.asarray(Image.open(train_mel["path"].iat[1])).astype(int)
    noisy = np.clip(noisy + np.random.default_rng(0).integers(-3, 4, noisy.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(src / "noisy.jpg", quality=95)
    novel = np.random.default_rng(1).integers(0, 256, (80, 96, 3), dtype=np.uint8)  # like no training image
    Image.fromarray(novel).save(src / "novel.jpg")
    (tmp_path / "fake" / "other").mkdir()
    Image.fromarray(np.full((80, 96, 3), 128, np.uint8)).save(tmp_path / "fake" / "other" / "grey.jpg")
    prepare([("folder", tmp_path / "fake")], tmp_path / "fakedata", CacheOptions(size=64), SplitAll(), seed=0)
    m = load_manifest(tmp_path / "fakedata")
    m = m.assign(split="train", source="synthetic")
    from melanogan.fileio import write_parquet

    write_parquet(tmp_path / "fakedata" / "manifest.parquet", m[m["label"] == 1])
    result = evaluate_gan(tmp_path / "fakedata", demo_prepared, tmp_path / "q", features=["pixels"], n_pairs=5)
    flagged = {p.rsplit("/", 1)[-1] for p in (f["synthetic"] for f in result["classes"]["melanoma"]["memorisation"]
                                               ["flagged"])}
    assert flagged == {"copy.jpg", "noisy.jpg"}


def SplitAll():
    from melanogan.data.splits import SplitFractions

    return SplitFractions(1.0, 0.0, 0.0)


def _fid_inception_with_random_weights(monkeypatch, tmp_path):
    """torch-fidelity's FID Inception with random weights (its constructor always loads weights:
    loading is skipped once here), and a state dict with the standard keys and shapes."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with monkeypatch.context() as m:
        m.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.save({}, tmp_path / "empty.pth")
        torch.manual_seed(0)
        model = FeatureExtractorInceptionV3("ref", ["2048"], feature_extractor_weights_path=str(tmp_path / "empty.pth"))
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def test_inception_is_the_standard_fid_network_from_a_local_file(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from melanogan.gan.features import FID_WEIGHTS_URL

    reference, state = _fid_inception_with_random_weights(monkeypatch, tmp_path)
    assert "Mixed_7c.branch_pool.conv.weight" in state and state["fc.weight"].shape == (1008, 2048)
    save_file(state, tmp_path / "fid.safetensors")  # standard keys and shapes (random values)
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for path in (tmp_path / "fid.safetensors", tmp_path / "fid.pth"):
        torch.save(state, tmp_path / "fid.pth")
        ex = create_extractor("inception", str(path))
        feats = ex(images)
        assert feats.shape == (2, 2048) and ex.describe()["input_size"] == 299
        with torch.no_grad():  # the library's own network, its own TF-style resize, on the same uint8 images
            expected = reference(images)[0]
        assert torch.allclose(feats, expected, atol=1e-5)
    # offline, no file: the error names the weights URL and the option
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(MelanoganError, match="--inception-weights FILE") as e:
        create_extractor("inception")
    assert FID_WEIGHTS_URL in str(e.value)
    with pytest.raises(MelanoganError, match="unknown feature extractor"):
        create_extractor("clip")
    (tmp_path / "bad.pth").write_bytes(b"junk")
    with pytest.raises(MelanoganError, match="never pickled"):
        create_extractor("inception", str(tmp_path / "bad.pth"))
    torchvision_state = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).state_dict()
    torch.save(torchvision_state, tmp_path / "tv.pth")  # torchvision's Inception is not the FID network
    with pytest.raises(MelanoganError, match="not the FID Inception-v3 weights"):
        create_extractor("inception", str(tmp_path / "tv.pth"))


def test_feature_cache_is_keyed_by_images_and_extractor(demo_prepared, tmp_path):
    from melanogan.data.dataset import CachedImageDataset

    ds = CachedImageDataset(demo_prepared, "val")
    ex = create_extractor("pixels")
    a = dataset_features(ds, ex, cache_dir=tmp_path)
    b = dataset_features(ds, ex, cache_dir=tmp_path)
    assert (a == b).all() and len(list(tmp_path.glob("*.npz"))) == 1
    dataset_features(CachedImageDataset(demo_prepared, "test"), ex, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_label_effect_pairs_noise_twins_and_ignores_the_rest(tmp_path):
    """Uniform images: the others 0, 30, 60 grey levels, each melanoma twin 10 brighter, so the label
    moves each image by 10 levels and the noise by 30, 30, 60 (ratio 10 / 40); a melanoma without a
    twin and a pair of another seed's twin must not count."""
    from PIL import Image

    from melanogan.fileio import write_parquet

    rows = []
    for seed, index, label, level in [(0, 0, 0, 0), (0, 1, 0, 30), (0, 2, 0, 60), (0, 0, 1, 10), (0, 1, 1, 40),
                                      (0, 2, 1, 70), (0, 5, 1, 255), (1, 0, 1, 200), (None, None, 0, 90),
                                      (None, None, 1, 120)]:
        path = tmp_path / f"s{seed}-{index}-{label}-{level}.png"
        Image.new("RGB", (64, 64), (level,) * 3).save(path)
        rows.append({"seed": seed, "noise_index": index, "label": label, "path": str(path)})
    write_parquet(tmp_path / "manifest.parquet", pd.DataFrame(rows))
    out = label_effect_of(tmp_path, size=8)
    pixel = np.sqrt(8 * 8 * 3) / 255  # one grey level over every pixel and channel
    assert out["pairs"] == 3 and out["label"] == pytest.approx(10 * pixel, abs=1e-4)
    assert out["noise"] == pytest.approx(40 * pixel, abs=1e-4) and out["ratio"] == pytest.approx(0.25, abs=1e-4)
    assert label_effect_of(tmp_path, pairs=1) is None  # one pair: no noise distance to compare with
    (tmp_path / "s0-1-1-40.png").write_bytes(b"not a png")
    with pytest.raises(MelanoganError, match=r"s0-1-1-40\.png: cannot read this synthetic image"):
        label_effect_of(tmp_path)


def test_evaluate_gan_reports_the_label_effect_of_noise_twins(syn_dir, demo_prepared, tmp_path):
    both = tmp_path / "both"
    for label in ("melanoma", "other"):  # one seed: image i of each class from the same noise vector
        generate(syn_dir.parent / "run", 4, label, both, seed=0)
    result = evaluate_gan(both, demo_prepared, tmp_path / "q", features=["pixels"], n_pairs=5)
    effect = label_effect_of(both)
    assert effect["pairs"] == 4 and result["label_effect"]["ratio"] == effect["ratio"] > 0
    assert result["summary"]["label effect (label / noise distance)"] == f"{effect['ratio']:.2f} (4 pairs)"
    assert "Conditioning" in (tmp_path / "q" / "quality.html").read_text()
