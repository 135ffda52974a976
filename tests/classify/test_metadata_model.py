"""A classifier trained with patient metadata: train, evaluate, predict, export and serve use it;
without it every field is "missing", the code the model saw for images without metadata."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from melanogan.classify.train import TrainConfig, load_model, predict_logits, train_classifier
from melanogan.data.metadata import encode_metadata, missing_vector
from melanogan.errors import MelanoganError

FIELDS = ["age", "sex", "site"]


@pytest.fixture(scope="module")
def meta_run(demo_prepared, tmp_path_factory):
    run = tmp_path_factory.mktemp("meta") / "run"
    cfg = TrainConfig(image_size=32, epochs=2, batch_size=8, workers=0, metadata="age,sex,site")
    summary = train_classifier(demo_prepared, run, cfg, progress=False)
    return run, summary


def test_training_records_metadata_and_missing_is_the_explicit_code(meta_run):
    run, _ = meta_run
    model, cfg, _ = load_model(run / "best")
    assert cfg.metadata == FIELDS and model.metadata_net is not None
    x = torch.rand(3, 3, 32, 32)
    missing = torch.from_numpy(np.tile(missing_vector(FIELDS), (3, 1)))
    with torch.no_grad():
        assert torch.equal(model(x), model(x, missing))  # None = every field missing
        given = torch.from_numpy(encode_metadata(pd.DataFrame({"age": [80, 20, 50], "sex": ["male", "female", None],
                                                               "anatom_site": ["back", "face", None]}), FIELDS))
        assert not torch.allclose(model(x), model(x, given))


def test_evaluate_uses_the_manifests_metadata(meta_run, demo_prepared):
    from melanogan.classify.evaluate import evaluate_run, predict_split
    from melanogan.data.dataset import CachedImageDataset
    from melanogan.data.transforms import eval_preset

    run, _ = meta_run
    model, cfg, _ = load_model(run / "best")
    scored = predict_split(model, cfg, demo_prepared, ["test"])
    ds = CachedImageDataset(demo_prepared, "test", transform=eval_preset(32), labels=[0, 1])
    by_hand = predict_logits(model, ds, metadata=encode_metadata(ds.rows, FIELDS))
    without = predict_logits(model, ds)
    assert scored["logit"].to_numpy() == pytest.approx(by_hand, abs=1e-5)
    assert not np.allclose(by_hand, without)
    assert evaluate_run(run, bootstrap=20)["n_images"] == len(ds)


def test_predict_takes_a_metadata_csv_and_says_what_it_used(meta_run, demo_raw, tmp_path):
    from melanogan.classify.predict import predict

    run, _ = meta_run
    images = sorted((demo_raw / "jpeg" / "train").glob("*.jpg"))[:2]
    (tmp_path / "meta.csv").write_text(f"image,age,sex,site\n{images[0].name},85,male,back\n")
    plain = predict(run, images, None, threshold="0.5")
    given = predict(run, images, None, threshold="0.5", metadata_csv=tmp_path / "meta.csv")
    assert list(plain["metadata"]) == ["missing", "missing"] and list(given["metadata"]) == ["given", "missing"]
    assert given["logit"].iat[0] != plain["logit"].iat[0] and given["logit"].iat[1] == plain["logit"].iat[1]


def test_a_run_without_metadata_refuses_a_metadata_csv(demo_prepared, demo_raw, tmp_path):
    from melanogan.classify.predict import predict

    run = tmp_path / "plain"
    train_classifier(demo_prepared, run, TrainConfig(image_size=32, epochs=1, batch_size=8, workers=0), progress=False)
    (tmp_path / "m.csv").write_text("image,age\na.jpg,40\n")
    with pytest.raises(MelanoganError, match="trained without metadata"):
        predict(run, [next((demo_raw / "jpeg" / "train").glob("*.jpg"))], None, metadata_csv=tmp_path / "m.csv")


def test_export_has_a_metadata_input_documented_in_the_sidecar(meta_run):
    from melanogan.classify.export import export_model

    run, _ = meta_run
    info = export_model(run, "torchscript")
    assert info["max_abs_difference_vs_pytorch"] < 1e-4
    meta = info["metadata_input"]
    assert meta["fields"] == FIELDS and meta["all_missing"] == missing_vector(FIELDS).tolist()
    assert meta["shape"] == ["batch", len(missing_vector(FIELDS))]
    traced = torch.jit.load(info["file"])
    model, _, _ = load_model(run / "best")
    x, m = torch.rand(2, 3, 32, 32), torch.from_numpy(np.tile(missing_vector(FIELDS), (2, 1)))
    with torch.no_grad():
        assert torch.allclose(traced(x, m), model(x), atol=1e-5)


def test_serve_predict_takes_optional_metadata_fields(meta_run, demo_raw, tmp_path):
    from fastapi.testclient import TestClient

    from melanogan.serve.app import ServeConfig, create_app

    run, _ = meta_run
    client = TestClient(create_app(ServeConfig(run_dir=run, db=tmp_path / "r.sqlite")), base_url="http://127.0.0.1:8000")
    data = next((demo_raw / "jpeg" / "train").glob("*.jpg")).read_bytes()
    assert 'name="age"' in client.get("/predict").text
    plain = client.post("/api/predict", files={"file": ("a.jpg", data)}).json()
    given = client.post("/api/predict", files={"file": ("a.jpg", data)},
                        data={"age": "85", "sex": "male", "site": "back"}).json()
    assert plain["metadata"] == "missing" and given["metadata"] == {"age": 85.0, "sex": "male", "anatom_site": "back"}
    assert given["probability"] != plain["probability"]
    bad = client.post("/api/predict", files={"file": ("a.jpg", data)}, data={"age": "old"})
    assert bad.status_code == 422 and "not a number of years" in bad.text
