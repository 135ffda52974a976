"""Operating points for a new site: exact cross-fitting on constructed scores, and the stored
calibration used by predict and export (and refused for another checkpoint)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from melanogan.classify import metrics as M
from melanogan.classify.calibrate import calibrate_site, cross_fitted_operating_points, site_file
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


def test_a_calibrated_site_drives_predict_and_export(run_and_site, tmp_path):
    from melanogan.classify.export import export_model
    from melanogan.classify.predict import predict

    run_and_site(40, 0.7, seed=3)  # the new site: darker images, a quarter melanoma
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


def test_a_site_calibrated_with_adapted_batchnorm_scores_with_it_in_predict_and_export(run_and_site, tmp_path,
                                                                                       monkeypatch):
    import torch

    import melanogan.classify.evaluate as evaluate_module
    from melanogan.classify.adapt import adapt_batchnorm, batchnorm_statistics, dataset_batches, even_batch_size
    from melanogan.classify.evaluate import predict_split, run_cache_options, split_dataset
    from melanogan.classify.export import export_model
    from melanogan.classify.predict import Predictor, predict
    from melanogan.classify.train import load_model
    from melanogan.data.manifest import cache_for

    run, data = run_and_site(40, 0.4, seed=5)  # the new site: much darker images, a quarter melanoma
    built = []
    monkeypatch.setattr(evaluate_module, "split_dataset",
                        lambda *a, **k: built.append(a[2]) or split_dataset(*a, **k))
    r = calibrate_site(run, data, "dark", adapt_batchnorm=True)
    monkeypatch.undo()
    assert built == [["all"]]  # the site sample is read once: adapted on and scored
    assert r["excluded_overlap"] == 0 and r["batchnorm"]["adapted_on_images"] == r["n_images"] == 40

    # the same adaptation by hand, on the same images with the run's preprocessing
    model, cfg, _ = load_model(run / "best")
    cache = cache_for(data, run_cache_options(run))
    ds, meta = split_dataset(cfg, data, ["all"], set(), cache)
    adapt_batchnorm(model, dataset_batches(ds, meta, torch.device("cpu"), even_batch_size(len(ds))))
    sample = predict_split(model, cfg, data, ["all"], cache=cache)  # temperature and thresholds are of these
    assert r["roc_auc"] == pytest.approx(M.roc_auc(sample["label"], sample["logit"]))
    assert r["temperature"] == pytest.approx(M.fit_temperature(sample["logit"], sample["label"]))

    at_site, plain = Predictor(run, site="dark"), Predictor(run)
    stats = batchnorm_statistics(model)
    assert all(torch.equal(batchnorm_statistics(at_site.model)[k], stats[k]) for k in stats)
    files = sorted((tmp_path / "site" / "nevus").glob("*.jpg"))[:4]
    x = torch.stack([at_site.preprocess_file(f)[1] for f in files])
    with torch.no_grad():
        by_hand = model(x).numpy()
    assert np.allclose(at_site.logits(x), by_hand, atol=1e-5)
    assert np.abs(plain.logits(x) - by_hand).max() > 1e-3  # adapting changed the scores
    scored = predict(run, files, site="dark")
    assert np.allclose(scored["logit"], by_hand, atol=1e-4)

    meta_out = export_model(run, "torchscript", tmp_path / "m.pt", site="dark")
    assert meta_out["batchnorm"] == "adapted to site dark on 40 images"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # jit.load is deprecated; the export's format still
        exported = torch.jit.load(str(tmp_path / "m.pt"))(x).detach().numpy()
    assert np.allclose(exported, by_hand, atol=1e-4)
    assert export_model(run, "torchscript", tmp_path / "p.pt")["batchnorm"] == "as trained"

    bn_file = site_file(run, "dark").parent / "batchnorm.safetensors"
    original = bn_file.read_bytes()
    bn_file.write_bytes(original[:-4] + b"\0\0\0\0")  # not the file calibrated with
    with pytest.raises(MelanoganError, match="not the file site 'dark' was calibrated with"):
        predict(run, files, site="dark")
    calibrate_site(run, data, "dark")  # again without adapting: no stale statistics are left to load
    assert not bn_file.exists()
    assert np.allclose(Predictor(run, site="dark").logits(x), plain.logits(x))

    # only the first 3 layers the forward pass reaches: theirs are the full adaptation's statistics, the
    # rest the run's own, and so are the scores
    shallow = calibrate_site(run, data, "shallow", adapt_batchnorm=True, adapt_layers=3)
    first = ["backbone.body.1", "backbone.body.4", "backbone.body.7"]  # stem BN, stage 1's two blocks
    assert shallow["batchnorm"]["adapted_layers"] == first and shallow["batchnorm"]["layers_of_model"] == 9
    at_shallow, own = batchnorm_statistics(Predictor(run, site="shallow").model), batchnorm_statistics(plain.model)
    for key in stats:
        expected = stats[key] if key.rsplit(".", 1)[0] in first else own[key]
        assert torch.equal(at_shallow[key], expected), key
    assert any(not torch.equal(stats[k], own[k]) for k in stats if k.rsplit(".", 1)[0] not in first)
    assert export_model(run, "torchscript", tmp_path / "s.pt", site="shallow")["batchnorm"] == (
        "adapted to site shallow on 40 images (first 3 of 9 layers)")
    with pytest.raises(MelanoganError, match="has 9; use 1 to 9"):
        calibrate_site(run, data, "deep", adapt_batchnorm=True, adapt_layers=10)
    with pytest.raises(MelanoganError, match="applies to --adapt-batchnorm"):
        calibrate_site(run, data, "deep", adapt_layers=3)
    assert not site_file(run, "deep").exists()

    with pytest.raises(MelanoganError, match="at least 32 images"):
        m = pd.read_parquet(data / "manifest.parquet")
        m.head(20).to_parquet(data / "manifest.parquet")
        calibrate_site(run, data, "few", adapt_batchnorm=True)
