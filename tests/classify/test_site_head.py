"""The site head (`calibrate --refit-head`): exact fits on constructed features, nested cross-validation
that never scores a case with a head fitted on it, and the stored head used by predict and export."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from melanogan.classify import metrics as M
from melanogan.classify.site_head import (
    by_diagnosis,
    choose_lambda,
    cross_validated_log_loss,
    fit_anchored_head,
    ranks_worse_notes,
    refit_head,
)
from melanogan.errors import MelanoganError


def _logistic_sample(n: int, w: np.ndarray, b: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, len(w)))
    y = (rng.random(n) < M.sigmoid(f @ w + b)).astype(float)
    return f, y


def test_infinite_lambda_keeps_the_trained_head_and_fits_the_intercept_only():
    f, y = _logistic_sample(300, np.array([1.0, -0.5]), -1.0, seed=0)
    w0 = np.array([0.7, 0.2])
    w, b = fit_anchored_head(f, y, w0, 0.0, math.inf)
    assert np.array_equal(w, w0)
    # the maximum-likelihood intercept: predicted and observed melanoma counts agree
    assert M.sigmoid(f @ w0 + b).sum() == pytest.approx(y.sum(), abs=1e-4)
    _, b_zero = fit_anchored_head(f, y, np.zeros(2), 0.0, math.inf)  # no slope: the logit of the base rate
    assert b_zero == pytest.approx(math.log(y.mean() / (1 - y.mean())), abs=1e-6)


def test_anchored_at_zero_on_standardised_features_it_is_sklearns_l2_logistic_regression():
    # mean BCE + lam/2 ||w||^2 is sklearn's C * sum BCE + 1/2 ||w||^2 divided by C n: lam = 1 / (C n)
    f, y = _logistic_sample(400, np.array([1.5, -1.0, 0.0]), -0.5, seed=1)
    f = (f - f.mean(0)) / f.std(0)  # unit population std: the penalty's scales are all 1
    for C in (0.01, 0.1, 1.0):
        ref = LogisticRegression(C=C, tol=1e-12, max_iter=10_000).fit(f, y)
        w, b = fit_anchored_head(f, y, np.zeros(3), 0.0, 1 / (C * len(y)))
        assert w == pytest.approx(ref.coef_[0], abs=1e-6) and b == pytest.approx(ref.intercept_[0], abs=1e-6)


def test_the_penalty_pulls_towards_the_trained_head_not_towards_zero():
    f, y = _logistic_sample(200, np.array([2.0, 0.0]), 0.0, seed=2)
    w0 = np.array([0.0, 3.0])  # a trained head along the wrong feature
    strong, _ = fit_anchored_head(f, y, w0, 0.0, 100.0)
    weak, _ = fit_anchored_head(f, y, w0, 0.0, 1e-4)
    assert np.abs(strong - w0).max() < 0.05  # held at the trained head
    assert weak[0] > 1.0 and abs(weak[1]) < 0.5  # the site's own direction


def test_lambda_choice_prefers_the_more_anchored_on_ties():
    assert choose_lambda({math.inf: 0.5, 1.0: 0.5, 0.1: 0.6}) == math.inf
    assert choose_lambda({math.inf: 0.5, 1.0: 0.4, 0.1: 0.4}) == 1.0


def test_a_site_whose_melanomas_lie_along_another_feature_gets_a_head_that_finds_them():
    rng = np.random.default_rng(3)
    n = 400
    y = (rng.random(n) < 0.25).astype(float)
    f = rng.normal(size=(n, 4))
    f[:, 1] += 2.0 * y  # at this site feature 1 separates; the trained head reads feature 0 only
    w0 = np.array([1.0, 0.0, 0.0, 0.0])
    fit = refit_head(f, y, np.arange(n).astype(str), w0, 0.0, folds=5, seed=0)
    assert M.roc_auc(y, f @ w0) < 0.6
    assert fit["lambda"] < math.inf and fit["weight"][1] > 1.0
    assert M.roc_auc(y, fit["out_of_fold_logits"]) > 0.85


def test_out_of_fold_scores_are_not_fitted_on_the_case_they_score():
    # 200 noise features, 120 cases: a head fitted on a case scores it almost perfectly; a case's
    # out-of-fold score must come from a head that never saw it, so the AUC stays near chance
    rng = np.random.default_rng(4)
    n, d = 120, 200
    f, y = rng.normal(size=(n, d)), (np.arange(n) % 4 == 0).astype(float)
    w, b = fit_anchored_head(f, y, np.zeros(d), 0.0, 1e-3)
    assert M.roc_auc(y, f @ w + b) > 0.99  # in-sample: memorised
    fit = refit_head(f, y, np.arange(n).astype(str), np.zeros(d), 0.0, lambdas=(1e-3,), folds=5, seed=0)
    assert M.roc_auc(y, fit["out_of_fold_logits"]) < 0.75


def test_folds_keep_a_group_together():
    # two images per lesion, the second a copy of the first: a split that separated them would let a
    # head memorise one and score its copy, and small lam would then win the cross-validation
    rng = np.random.default_rng(5)
    n, d = 80, 150
    f = np.repeat(rng.normal(size=(n, d)), 2, axis=0)
    y = np.repeat((np.arange(n) % 4 == 0).astype(float), 2)
    groups = np.repeat(np.arange(n), 2).astype(str)
    losses = cross_validated_log_loss(f, y, groups, np.zeros(d), 0.0, lambdas=(math.inf, 1e-4), folds=5, seed=0)
    assert choose_lambda(losses) == math.inf
    leaky = cross_validated_log_loss(f, y, np.arange(2 * n).astype(str), np.zeros(d), 0.0,
                                     lambdas=(math.inf, 1e-4), folds=5, seed=0)
    assert leaky[1e-4] < losses[1e-4]  # split by image, the copies leak (what grouping prevents)


def test_by_diagnosis_gives_each_benign_diagnosis_its_auc_against_all_melanomas_by_both_heads():
    y = np.array([1, 1, 0, 0, 0, 0, 0, 0])
    dx = np.array(["mel", "mel", "nevus", "nevus", "nevus", "bcc", "bcc", None], dtype=object)
    trained = np.array([2, 0, 1, -1, -2, 3, -3, 5.0])
    refitted = np.array([2, 0, -1, -2, -3, 3, 1, 5.0])
    rows = by_diagnosis(y, trained, refitted, dx, min_images=2, bootstrap=0)
    # nevus: melanomas {2, 0} above {1, -1, -2} in 5 of 6 pairs, above {-1, -2, -3} in all;
    # bcc: {2, 0} above {3, -3} in 2 of 4 pairs, above {3, 1} in 1 of 4; the one unlabelled image too few
    assert rows == [{"diagnosis": "nevus", "n_images": 3, "roc_auc_trained_head": pytest.approx(5 / 6),
                     "roc_auc_refitted_head": 1.0, "difference_ci95": None},
                    {"diagnosis": "bcc", "n_images": 2, "roc_auc_trained_head": 0.5, "roc_auc_refitted_head": 0.25,
                     "difference_ci95": None}]
    assert by_diagnosis(y, trained, refitted, dx, min_images=1, bootstrap=0)[-1] == {
        "diagnosis": "unknown", "n_images": 1, "roc_auc_trained_head": 0.0, "roc_auc_refitted_head": 0.0,
        "difference_ci95": None}
    assert [r["diagnosis"] for r in by_diagnosis(y, trained, refitted, dx, min_images=3)] == ["nevus"]

    notes = ranks_worse_notes(rows, min_images=2)  # bcc fell 0.25; nevus rose
    assert len(notes) == 1 and "bcc (2 images)" in notes[0] and "0.500 -> 0.250" in notes[0]
    assert ranks_worse_notes(rows, min_images=3) == []  # too few to name
    edge = [{"diagnosis": "d", "n_images": 40, "roc_auc_trained_head": 0.8, "roc_auc_refitted_head": 0.76},
            {"diagnosis": "e", "n_images": 40, "roc_auc_trained_head": 0.8, "roc_auc_refitted_head": 0.74}]
    assert [n.split(" (")[0] for n in ranks_worse_notes(edge)] == ["the refitted head ranks the sample's e"]


def test_by_diagnosis_gives_each_difference_a_paired_ci_over_the_groups_of_that_comparison():
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(30, int), np.zeros(80, int)]
    dx = np.r_[["mel"] * 30, ["nevus"] * 50, ["bcc"] * 30].astype(object)
    groups = np.r_[np.arange(30) // 2, 100 + np.arange(50) // 5, 200 + np.arange(30) // 3]  # 2, 5, 3 per patient
    trained = rng.normal(size=110) + y
    refitted = trained + np.where(dx == "bcc", 0.8, -0.3) * rng.random(110)
    rows = {r["diagnosis"]: r for r in by_diagnosis(y, trained, refitted, dx, groups=groups, bootstrap=400, seed=5)}
    for name in ("nevus", "bcc"):
        both = (y == 1) | (dx == name)  # all the melanomas and that group only, resampled by patient
        d = M.paired_bootstrap_auc_difference(y[both], [refitted[both]], [trained[both]], groups[both], n=400, seed=5)
        assert rows[name]["difference_ci95"] == [pytest.approx(d["ci_low"]), pytest.approx(d["ci_high"])]
        assert d["ci_low"] <= d["difference"] <= d["ci_high"]
    per_image = by_diagnosis(y, trained, refitted, dx, bootstrap=400, seed=5)
    by_patient = {k: r["difference_ci95"] for k, r in rows.items()}
    assert {r["diagnosis"]: r["difference_ci95"] for r in per_image} != by_patient  # the groups are used
    same = by_diagnosis(y, trained, trained, dx, groups=groups, bootstrap=200)
    assert [r["difference_ci95"] for r in same] == [[0.0, 0.0], [0.0, 0.0]]  # one head against itself
    note = ranks_worse_notes([{**rows["nevus"], "roc_auc_refitted_head": rows["nevus"]["roc_auc_trained_head"] - 0.1}])
    low, high = rows["nevus"]["difference_ci95"]
    assert len(note) == 1 and f"difference 95% CI [{low:+.3f}, {high:+.3f}]" in note[0]
    # a CI that reaches zero: the note says the sample cannot tell, instead of stating the loss
    worse = {"diagnosis": "bcc", "n_images": 40, "roc_auc_trained_head": 0.8, "roc_auc_refitted_head": 0.7}
    (sure,) = ranks_worse_notes([{**worse, "difference_ci95": [-0.18, -0.02]}])
    (unsure,) = ranks_worse_notes([{**worse, "difference_ci95": [-0.18, 0.0]}])
    assert sure.startswith("the refitted head ranks the sample's bcc") and "cannot tell" not in sure
    assert unsure.startswith("the refitted head may rank the sample's bcc") and "cannot tell that loss from chance" \
        in unsure and "--no-refit-head" not in unsure


def test_a_site_with_a_refitted_head_scores_with_it_in_predict_and_export(run_and_site, tmp_path):
    from melanogan.classify.calibrate import calibrate_site, site_file
    from melanogan.classify.evaluate import run_cache_options, score_dataset, split_dataset
    from melanogan.classify.export import export_model
    from melanogan.classify.predict import Predictor, predict
    from melanogan.classify.site_head import captured_head_inputs
    from melanogan.classify.train import load_model
    from melanogan.data.manifest import cache_for

    run, data = run_and_site(96, 0.6, seed=6)  # the new site: darker images, a quarter melanoma (24)
    r = calibrate_site(run, data, "refit")  # the default refits: the sample has 24 melanomas and 72 others
    h = r["head"]
    assert h["fitted_on_images"] == r["n_images"] == 96 and r["n_melanoma"] == 24

    # by hand: the same features, the same nested fit; every reported figure from out-of-fold logits
    model, cfg, _ = load_model(run / "best")
    ds, meta = split_dataset(cfg, data, ["all"], set(), cache_for(data, run_cache_options(run)))
    with captured_head_inputs(model) as seen:
        sample = score_dataset(model, ds, meta)
    layer = model.head[-1]
    fit = refit_head(torch.cat(seen).numpy(), sample["label"].to_numpy(), sample["group"].to_numpy(),
                     layer.weight.detach().double().numpy().reshape(-1), float(layer.bias.detach()), seed=cfg.seed)
    y, oof = sample["label"].to_numpy(), fit["out_of_fold_logits"]
    assert r["roc_auc"] == pytest.approx(M.roc_auc(y, oof))
    assert h["roc_auc_trained_head"] == pytest.approx(M.roc_auc(y, sample["logit"]))
    assert r["temperature"] == pytest.approx(M.fit_temperature(oof, y))
    assert h["lambda"] == ("inf" if math.isinf(fit["lambda"]) else fit["lambda"])
    # the site's one benign diagnosis (its folder, "nevus") against its melanomas: the overall AUCs, and
    # the refitted - trained difference's CI by a paired bootstrap over the sample's patients
    d = M.paired_bootstrap_auc_difference(y, [oof], [sample["logit"].to_numpy()], sample["group"].to_numpy(),
                                          n=1000, seed=cfg.seed)
    assert h["by_diagnosis"] == [{"diagnosis": "nevus", "n_images": 72,
                                  "roc_auc_trained_head": pytest.approx(M.roc_auc(y, sample["logit"])),
                                  "roc_auc_refitted_head": pytest.approx(M.roc_auc(y, oof)),
                                  "difference_ci95": [pytest.approx(d["ci_low"]), pytest.approx(d["ci_high"])]}]

    at_site, plain = Predictor(run, site="refit"), Predictor(run)
    files = sorted((tmp_path / "site" / "melanoma").glob("*.jpg"))[:4]
    x = torch.stack([at_site.preprocess_file(f)[1] for f in files])
    with torch.no_grad(), captured_head_inputs(plain.model) as feats:
        plain.model(x)
    by_hand = feats[0].double().numpy() @ fit["weight"] + fit["bias"]
    assert np.allclose(at_site.logits(x), by_hand, atol=1e-4)
    scored = predict(run, files, site="refit")
    assert np.allclose(scored["probability"], M.sigmoid(by_hand / r["temperature"]), atol=1e-4)
    meta_out = export_model(run, "torchscript", tmp_path / "m.pt", site="refit")
    assert meta_out["head"] == f"refitted on site refit's 96 labelled images (lambda {h['lambda']})"
    assert export_model(run, "torchscript", tmp_path / "p.pt")["head"] == "as trained"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        exported = torch.jit.load(str(tmp_path / "m.pt"))(x).detach().numpy()
    assert np.allclose(exported, by_hand, atol=1e-4)

    head_file = site_file(run, "refit").parent / "head.safetensors"
    head_file.write_bytes(head_file.read_bytes()[:-4] + b"\0\0\0\0")  # not the file calibrated with
    with pytest.raises(MelanoganError, match=r"not the file site 'refit' was calibrated with.*--refit-head"):
        predict(run, files, site="refit")
    calibrate_site(run, data, "refit", refit_head=False)  # again without refitting: no stale head is left
    assert not head_file.exists() and json.loads(site_file(run, "refit").read_text())["head"] is None
    assert np.allclose(Predictor(run, site="refit").logits(x), plain.logits(x))

    m = pd.read_parquet(data / "manifest.parquet")
    pd.concat([m[m["label"] == 0], m[m["label"] == 1].head(12)]).to_parquet(data / "manifest.parquet")
    with pytest.raises(MelanoganError, match=r"at least 20 melanomas.*has 12 and 72"):
        calibrate_site(run, data, "few", refit_head=True)
    assert not site_file(run, "few").exists()
    notes = []  # by default a sample too small for a refit keeps the trained head, and says so
    assert calibrate_site(run, data, "few", log=notes.append)["head"] is None
    assert any("kept as trained" in n and "it has 12 and 72" in n for n in notes)
