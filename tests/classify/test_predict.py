"""predict and explain on a classifier trained on the demo phantoms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from melanogan.classify.predict import explain, gradcam, predict
from melanogan.classify.train import TrainConfig, load_model, train_classifier
from melanogan.data.demo import render_phantom
from melanogan.errors import MelanoganError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """small-cnn trained on 300 phantoms (half melanoma) at 64px: enough to learn what a lesion is."""
    from melanogan.data.cache import CacheOptions
    from melanogan.data.demo import generate_demo_dataset
    from melanogan.data.manifest import prepare

    root = tmp_path_factory.mktemp("cls")
    generate_demo_dataset(root / "raw", n_images=300, melanoma_rate=0.5, seed=3, width=128, height=112)
    prepare([("siim-isic-2020", root / "raw")], root / "data", CacheOptions(size=96), seed=0)
    cfg = TrainConfig(model="small-cnn", image_size=64, epochs=10, batch_size=16, workers=0, lr=3e-3,
                      augment="classic")
    train_classifier(root / "data", root / "run", cfg, progress=False)
    return root / "run"


def test_predict_folder_with_bad_files(trained, demo_raw, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for p in sorted((demo_raw / "jpeg" / "train").glob("*.jpg"))[:5]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_text("not an image")
    table = predict(trained, [folder], tmp_path / "p.csv", threshold="val-youden")
    assert len(table) == 6 and (tmp_path / "p.csv").is_file()
    broken = table[table["path"].str.endswith("broken.jpg")].iloc[0]
    assert broken["error"].startswith("not-an-image") and np.isnan(broken["probability"])
    ok = table[table["error"] == ""]
    assert ok["probability"].between(0, 1).all() and set(ok["decision"]) <= {"melanoma", "not melanoma"}
    assert (trained / "best" / "thresholds.json").is_file()
    fixed = predict(trained, [folder], None, threshold="0.5")
    assert (fixed["threshold"] == 0.5).all() and (fixed["threshold_name"] == "fixed").all()
    with pytest.raises(MelanoganError, match="--threshold"):
        predict(trained, [folder], None, threshold="high")


def test_gradcam_follows_the_lesion(trained, tmp_path):
    """One melanoma phantom pasted into opposite corners of plain skin: the heat map moves with it."""
    lesion = render_phantom(np.random.default_rng(7), True, 128, 128)
    cams = {}
    for corner, (y, x) in {"top-left": (0, 0), "bottom-right": (128, 128)}.items():
        canvas = np.zeros((256, 256, 3), np.uint8)
        canvas[:] = lesion[5, 64]  # skin colour near the edge of the phantom
        canvas[y:y + 128, x:x + 128] = lesion
        Image.fromarray(canvas).save(tmp_path / f"{corner}.png")
        result = explain(trained, tmp_path / f"{corner}.png", tmp_path / f"{corner}-heat.png")
        assert (tmp_path / f"{corner}-heat.png").is_file()
        cams[corner] = result["cam"]
    h, w = cams["top-left"].shape
    tl, br = (slice(0, h // 2), slice(0, w // 2)), (slice(h // 2, h), slice(w // 2, w))
    assert cams["top-left"][tl].mean() > cams["top-left"][br].mean()
    assert cams["bottom-right"][br].mean() > cams["bottom-right"][tl].mean()


@pytest.mark.parametrize("name", ["original-cnn", "resnet18", "vit_b_16"])
def test_gradcam_works_for_other_architectures(name):
    import torch

    from melanogan.classify.models import create_classifier

    model = create_classifier(name, 32)
    cam = gradcam(model, torch.randn(3, 32, 32))
    assert cam.shape == (32, 32) and cam.min() >= 0 and cam.max() <= 1


class _Payload:
    """Unpickling this runs code (it creates a marker file): what a malicious .pth would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_loading_is_safe(trained, tmp_path):
    import shutil

    import torch

    from melanogan.classify.models import read_weights_file

    _, cfg, state = load_model(trained / "best")
    assert cfg.model == "small-cnn" and "epoch" in state
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"conv.weight": _Payload(marker)}, evil)
    with pytest.raises(MelanoganError, match="never pickled models"):  # --weights FILE
        read_weights_file(evil)
    best = tmp_path / "best"  # a checkpoint folder whose weights file is that pickle
    shutil.copytree(trained / "best", best)
    shutil.copy(evil, best / "model.safetensors")
    with pytest.raises(MelanoganError, match="unreadable"):
        load_model(best)
    assert not marker.exists()  # the payload never ran


def _pytorch_and_exported(run_dir, exported_file, fmt: str, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The run's best model in PyTorch and the exported file run by its own runtime, on one batch."""
    model, _, _ = load_model(run_dir / "best")
    with torch.no_grad():
        reference = model.float().eval()(torch.from_numpy(batch)).numpy()
    if fmt == "onnx":
        import onnxruntime as ort

        exported = ort.InferenceSession(str(exported_file)).run(None, {"image": batch})[0]
    else:
        exported = torch.jit.load(str(exported_file)).eval()(torch.from_numpy(batch)).detach().numpy()
    return reference, exported


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch(trained, tmp_path, fmt):
    import json

    from melanogan.classify.export import export_model
    from melanogan.classify.predict import run_thresholds

    meta = export_model(trained, fmt, tmp_path / f"model.{fmt}")
    saved = json.loads((tmp_path / f"model.{fmt}.json").read_text())
    assert saved["input"]["shape"][1:] == [3, 64, 64] and saved["preprocessing"]["decode"]["size"] == 96
    assert saved["thresholds"] == pytest.approx(run_thresholds(trained))  # this checkpoint's thresholds
    # The exported file itself, run by its own runtime, against PyTorch on a batch of 5 real-looking inputs
    # (5: the export traced a batch of 2, so this also checks the dynamic batch size).
    batch = np.random.default_rng(0).normal(size=(5, 3, 64, 64)).astype(np.float32)
    reference, exported = _pytorch_and_exported(trained, tmp_path / f"model.{fmt}", fmt, batch)
    assert exported.shape == reference.shape == (5,)
    assert np.abs(exported - reference).max() <= 1e-4
    assert meta["max_abs_difference_vs_pytorch"] <= 1e-4


def test_export_errors(trained, tmp_path):
    from melanogan.classify.export import export_model

    with pytest.raises(MelanoganError, match="--format 'tflite'"):
        export_model(trained, "tflite")


def test_evaluate_and_predict_with_tta_average_flipped_logits_and_choose_thresholds_the_same_way(trained, tmp_path):
    import json

    import pandas as pd

    from melanogan.classify import metrics as M
    from melanogan.classify.evaluate import evaluate_run
    from melanogan.classify.predict import run_thresholds
    from melanogan.data.dataset import CachedImageDataset
    from melanogan.data.transforms import eval_preset
    from melanogan.fileio import read_json

    model, cfg, _ = load_model(trained / "best")
    data_dir = read_json(trained / "run.json")["data_dir"]

    def by_hand(split):
        ds = CachedImageDataset(data_dir, split, transform=eval_preset(cfg.image_size))
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        with torch.no_grad():
            return ds.rows["uid"].tolist(), ((model(x) + model(x.flip(-1))) / 2).numpy(), ds.rows["label"].to_numpy()

    run_thresholds(trained)  # the plain thresholds first (stored by predict): TTA must leave them as they are
    plain_thresholds = (trained / "best" / "thresholds.json").read_text()
    result = evaluate_run(trained, tta=2, bootstrap=20)
    assert result["out"].endswith("eval-test-tta2") and result["tta"] == 2
    written = pd.read_csv(f"{result['out']}/predictions.csv").set_index("uid")["logit"]
    uids, logits, _ = by_hand("test")
    assert written.loc[uids].to_numpy() == pytest.approx(logits, abs=1e-4)
    _, val_logits, val_labels = by_hand("val")
    youden = M.threshold_youden(val_labels, M.sigmoid(val_logits))
    assert result["thresholds"]["val_youden"]["threshold"] == pytest.approx(youden, abs=1e-4)
    assert run_thresholds(trained, tta=2)["val-youden"] == pytest.approx(youden, abs=1e-4)
    stored = json.loads((trained / "best" / "thresholds-tta2.json").read_text())
    assert stored["tta"] == 2 and (trained / "best" / "thresholds.json").read_text() == plain_thresholds
    image = next(p for p in (trained.parent / "raw" / "jpeg" / "train").glob("*.jpg"))
    plain, flipped = predict(trained, [image], None), predict(trained, [image], None, tta=2)
    assert flipped["threshold"].iat[0] == pytest.approx(youden, abs=1e-4)
    assert flipped["logit"].iat[0] != plain["logit"].iat[0]
    with pytest.raises(MelanoganError, match=r"--site .* --tta 2"):
        predict(trained, [image], None, site="anywhere", tta=2)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_instance_batch_norm_model_exports_and_matches_pytorch(demo_prepared, tmp_path, fmt):
    """small-cnn-ibn's per-image statistics (var_mean in float32) survive both exporters."""
    from melanogan.classify.export import export_model

    cfg = TrainConfig(model="small-cnn-ibn", image_size=32, epochs=1, batch_size=8, workers=0)
    train_classifier(demo_prepared, tmp_path / "run", cfg, progress=False)
    meta = export_model(tmp_path / "run", fmt, tmp_path / f"model.{fmt}")
    batch = np.random.default_rng(1).normal(size=(4, 3, 32, 32)).astype(np.float32) * 3 + 1
    reference, exported = _pytorch_and_exported(tmp_path / "run", tmp_path / f"model.{fmt}", fmt, batch)
    assert np.abs(exported - reference).max() <= 1e-4 and meta["max_abs_difference_vs_pytorch"] <= 1e-4


def test_the_export_sidecar_spells_out_the_hair_mask_of_a_run_from_before_the_option():
    from melanogan.classify.export import _decode_options

    recorded = {"size": 256, "resize_mode": "crop", "hair_removal": True, "color_constancy": True,
                "max_pixels": 100_000_000}
    assert _decode_options({"cache_options": recorded}) == {**recorded, "hair_method": "blackhat", "white_level": 0,
                                                               "clahe": 0.0}
    assert _decode_options({"cache_options": {**recorded, "hair_removal": False}})["hair_method"] == "lines"
    assert _decode_options({}) is None
