"""Operating points for a new site: exact cross-fitting on constructed scores, and the stored
calibration used by predict and export (and refused for another checkpoint)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from melanogan.classify import metrics as M
from melanogan.classify.calibrate import calibrate_site, cross_fitted_operating_points, site_file
from melanogan.classify.train import TrainConfig, train_classifier
from melanogan.data.cache import CacheOptions
from melanogan.data.manifest import prepare
from melanogan.errors import MelanoganError


def test_cross_fitting_on_separable_scores_is_exact_and_its_cis_are_binomial():
    y = np.array([1] * 10 + [0] * 30)
    p = np.where(y == 1, 0.9, 0.1)
    out = cross_fitted_operating_points(y, p, np.arange(40).astype(str), folds=5)
    for name in ("val-youden", "val-sens95"):
        e = out[name]
        assert (e["tp"], e["fn"], e["tn"], e["fp"]) == (10, 0, 30, 0)
        assert e["sensitivity"] == e["specificity"] == 1.0
        assert e["sensitivity_ci95"] == pytest.approx(M.clopper_pearson(10, 10))  # 10 melanomas: [0.69, 1]
        assert e["specificity_ci95"] == pytest.approx(M.clopper_pearson(30, 30))


def test_cross_fitting_never_decides_a_case_with_a_threshold_chosen_on_it():
    # one melanoma scored below every other: a threshold chosen with it in the sample would include it
    y = np.array([1] * 6 + [0] * 20)
    p = np.concatenate([[0.05], [0.9] * 5, np.linspace(0.1, 0.3, 20)])
    e = cross_fitted_operating_points(y, p, np.arange(26).astype(str), folds=3)["val-youden"]
    assert e["fn"] >= 1 and e["tp"] + e["fn"] == 6 and e["tn"] + e["fp"] == 20


def test_a_calibrated_site_drives_predict_and_export(demo_raw, tmp_path):
    from PIL import Image

    from melanogan.classify.export import export_model
    from melanogan.classify.predict import predict
    from melanogan.data.demo import render_phantom

    prepare([("siim-isic-2020", demo_raw)], tmp_path / "own", CacheOptions(size=32), seed=0)
    cfg = TrainConfig(model="small-cnn", image_size=32, epochs=2, batch_size=8, workers=0)
    train_classifier(tmp_path / "own", tmp_path / "run", cfg, progress=False)
    rng = np.random.default_rng(3)
    for k in range(40):  # the new site: darker images, a quarter melanoma
        cls = "melanoma" if k % 4 == 0 else "nevus"
        (tmp_path / "site" / cls).mkdir(parents=True, exist_ok=True)
        img = (render_phantom(rng, cls == "melanoma", 96, 80) * 0.7).astype(np.uint8)
        Image.fromarray(img).save(tmp_path / "site" / cls / f"{k}.jpg")
    prepare([("folder", tmp_path / "site")], tmp_path / "sitedata", CacheOptions(size=48), seed=0)
    with pytest.raises(MelanoganError, match="--site 'a/b'"):
        calibrate_site(tmp_path / "run", tmp_path / "sitedata", "a/b")
    r = calibrate_site(tmp_path / "run", tmp_path / "sitedata", "clinic-b")
    assert r["n_images"] == 40 - r["excluded_overlap"] and r["n_melanoma"] >= 5
    stored = json.loads(site_file(tmp_path / "run", "clinic-b").read_text())
    assert stored["thresholds"] == pytest.approx(r["thresholds"]) and stored["temperature"] > 0
    e = stored["expected"]["val-youden"]
    assert e["tp"] + e["fn"] == r["n_melanoma"] and e["tn"] + e["fp"] == r["n_images"] - r["n_melanoma"]

    files = sorted((tmp_path / "site" / "melanoma").glob("*.jpg"))[:3]
    plain = predict(tmp_path / "run", files)
    at_site = predict(tmp_path / "run", files, site="clinic-b")
    assert at_site["threshold"].iat[0] == pytest.approx(r["thresholds"]["val-youden"])
    assert at_site["threshold_name"].iat[0] == "site:clinic-b:youden"
    assert np.allclose(at_site["probability"], M.sigmoid(plain["logit"] / r["temperature"]))
    meta = export_model(tmp_path / "run", "torchscript", tmp_path / "m.pt", site="clinic-b")
    assert meta["thresholds"] == pytest.approx(r["thresholds"]) and meta["temperature"] == r["temperature"]

    stored["checkpoint_sha256"] = "0" * 64  # as if best/ had changed since
    site_file(tmp_path / "run", "clinic-b").write_text(json.dumps(stored))
    with pytest.raises(MelanoganError, match="another checkpoint"):
        predict(tmp_path / "run", files, site="clinic-b")
    with pytest.raises(MelanoganError, match="no calibration for site 'elsewhere'"):
        predict(tmp_path / "run", files, site="elsewhere")
    (tmp_path / "own").rename(tmp_path / "own-moved")  # a run folder calibrated where its data is not
    notes = []
    away = calibrate_site(tmp_path / "run", tmp_path / "sitedata", "away", log=notes.append)
    assert away["excluded_overlap"] is None and away["n_images"] == 40
    assert any("cannot be removed from the site sample" in n and str(tmp_path / "own") in n for n in notes)
    m = pd.read_parquet(tmp_path / "sitedata" / "manifest.parquet")
    pd.concat([m[m["label"] == 0], m[m["label"] == 1].head(3)]).to_parquet(tmp_path / "sitedata" / "manifest.parquet")
    with pytest.raises(MelanoganError, match=r"3 melanoma.*label at least 5"):
        calibrate_site(tmp_path / "run", tmp_path / "sitedata", "tiny")


def test_sample_size_curve_narrows_with_more_local_cases():
    from melanogan.classify.calibrate import sample_size_curve

    rng = np.random.default_rng(0)
    y = (rng.random(2000) < 0.2).astype(int)
    p = M.sigmoid(1.5 * y + rng.normal(size=2000))
    rows = sample_size_curve(y, p, np.arange(2000).astype(str), [50, 400], repeats=60, seed=1)
    assert [r["n"] for r in rows] == [50, 400]
    small, large = rows
    spread = [r["sensitivity_2.5_97.5"][1] - r["sensitivity_2.5_97.5"][0] for r in rows]
    assert spread[1] < spread[0] and large["reported_ci_width_sensitivity"] < small["reported_ci_width_sensitivity"]
    assert 0.5 < large["sensitivity_median"] < 0.95 and 0.5 < large["specificity_median"] < 0.95
