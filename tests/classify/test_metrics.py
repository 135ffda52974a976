"""Metric functions against scikit-learn and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, confusion_matrix, roc_auc_score

from melanogan.classify import metrics as M

Y = np.array([0, 0, 0, 0, 1, 0, 1, 1, 0, 1])
S = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])


def test_aucs_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = y * 0.7 + rng.normal(0, 0.5, 300)
    assert M.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert M.pr_auc(y, s) == pytest.approx(average_precision_score(y, s))
    assert math.isnan(M.roc_auc([1, 1], [0.2, 0.3]))


def test_worst_group_auc_by_hand():
    # source a: 2 mel, 2 other, one pair misordered -> 3/4; source b: perfect -> 1; source c: one class
    y = [1, 1, 0, 0, 1, 0, 0]
    s = [0.9, 0.4, 0.5, 0.1, 0.2, 0.1, 0.8]
    g = ["a", "a", "a", "a", "b", "b", "c"]
    assert M.roc_auc_by_group(y, s, g) == {"a": 0.75, "b": 1.0}
    assert M.worst_group_auc(y, s, g) == 0.75
    # pooled, source b's melanoma (0.2) sits below two of a's others: the pooled AUC hides the worst source
    assert M.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s)) and M.roc_auc(y, s) != 0.75
    assert math.isnan(M.worst_group_auc([1, 0], [0.3, 0.2], ["a", "b"]))
    with pytest.raises(ValueError, match="groups"):
        M.roc_auc_by_group([1, 0], [0.3, 0.2], ["a"])


def test_case_mix_auc_by_hand_is_the_pooled_auc_at_the_own_mix():
    # 3 melanomas against 4 naevi (10 of 12 pairs right) and 2 keratoses (2 of 6)
    y = [1, 1, 1, 0, 0, 0, 0, 0, 0]
    s = [0.9, 0.6, 0.3, 0.1, 0.2, 0.4, 0.5, 0.7, 0.8]
    kinds = ["melanoma"] * 3 + ["nevus"] * 4 + ["keratosis"] * 2
    own = M.case_mix_auc(y, s, kinds, {"nevus": 4, "keratosis": 2})
    assert own == (pytest.approx(2 / 3), 1.0) and M.roc_auc(y, s) == pytest.approx(2 / 3)
    assert M.case_mix_auc(y, s, kinds, {"nevus": 0.9, "keratosis": 0.1})[0] == pytest.approx(0.9 * 5 / 6 + 0.1 / 3)
    # a kind of the mix that this site lacks drops out; the share of the mix covered says how much
    assert M.case_mix_auc(y, s, kinds, {"nevus": 0.9, "keratosis": 0.1, "carcinoma": 0.5}) == (
        pytest.approx(0.9 * 5 / 6 + 0.1 / 3), pytest.approx(1 / 1.5))
    assert M.case_mix_auc(y, s, kinds, {"nevus": 0.9, "keratosis": 0.1}, min_per_kind=3) == (
        pytest.approx(5 / 6), pytest.approx(0.9))
    assert math.isnan(M.case_mix_auc([0, 0], [0.1, 0.2], ["nevus"] * 2, {"nevus": 1})[0])
    assert M.case_mix_auc(y, s, kinds, {"carcinoma": 1})[1] == 0.0
    with pytest.raises(ValueError, match="kinds"):
        M.case_mix_auc(y, s, kinds[:-1], {"nevus": 1})


def test_confusion_by_hand():
    c = M.confusion_at(Y, S, 0.5)
    # predicted positive: 0.5(0) 0.6(1) 0.7(1) 0.8(0) 0.9(1)
    assert (c["tp"], c["fp"], c["tn"], c["fn"]) == (3, 2, 4, 1)
    tn, fp, fn, tp = confusion_matrix(Y, S >= 0.5).ravel()
    assert (tn, fp, fn, tp) == (4, 2, 1, 3)
    assert c["sensitivity"] == pytest.approx(0.75) and c["specificity"] == pytest.approx(4 / 6)
    assert c["precision"] == pytest.approx(0.6) and c["accuracy"] == pytest.approx(0.7)
    assert c["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert c["balanced_accuracy"] == pytest.approx((0.75 + 4 / 6) / 2)


def test_threshold_selection_by_hand():
    # Youden: t=0.4 gives sens 1, spec 4/6 -> J 0.667; t=0.6 gives 0.75 + 5/6 - 1 = 0.583
    assert M.threshold_youden(Y, S) == pytest.approx(0.4)
    # 95% sensitivity of 4 positives needs all 4: the lowest positive score
    assert M.threshold_for_sensitivity(Y, S, 0.95) == pytest.approx(0.4)
    assert M.threshold_for_sensitivity(Y, S, 0.75) == pytest.approx(0.6)
    assert M.specificity_at_sensitivity(Y, S, 0.95) == pytest.approx(4 / 6)
    assert M.specificity_at_sensitivity(Y, S, 0.5) == pytest.approx(5 / 6)  # t=0.7
    # specificity >= 80% of 6 negatives means 5 below t: t just above 0.5 -> positives 0.6,0.7,0.9
    assert M.sensitivity_at_specificity(Y, S, 0.8) == pytest.approx(0.75)


def test_brier_and_ece_known_case():
    p = np.array([0.1, 0.1, 0.9, 0.9])
    y = np.array([0, 1, 1, 1])
    assert M.brier(y, p) == pytest.approx(brier_score_loss(y, p))
    # bins: [0.1, 0.1] observed 0.5 vs conf 0.1 -> 0.4; [0.9, 0.9] observed 1 vs 0.9 -> 0.1
    assert M.expected_calibration_error(y, p, n_bins=10) == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    assert M.expected_calibration_error([0, 1], [0.0, 1.0]) == pytest.approx(0.0)


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(0, 2, 20000)
    y = (rng.uniform(size=20000) < M.sigmoid(true_logits)).astype(int)
    t = M.fit_temperature(true_logits * 3.0, y)  # over-confident by 3x
    assert t == pytest.approx(3.0, rel=0.08)


def test_delong_matches_auc_and_a_bootstrap_of_the_difference():
    rng = np.random.default_rng(2)
    n = 400
    y = rng.integers(0, 2, n)
    s1 = y * 1.0 + rng.normal(0, 1, n)
    s2 = y * 0.6 + 0.5 * s1 + rng.normal(0, 1, n)
    d = M.delong_test(y, s1, s2)
    assert d["auc_1"] == pytest.approx(roc_auc_score(y, s1))
    assert d["auc_2"] == pytest.approx(roc_auc_score(y, s2))
    diffs = []
    for _ in range(800):
        i = rng.integers(0, n, n)
        if 0 < y[i].sum() < n:
            diffs.append(roc_auc_score(y[i], s1[i]) - roc_auc_score(y[i], s2[i]))
    assert d["se"] == pytest.approx(np.std(diffs), rel=0.15)
    same = M.delong_test(y, s1, s1)
    assert same["difference"] == 0 and same["p_value"] == 1.0


def test_grouped_bootstrap_is_wider_when_groups_are_duplicated():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 100)
    s = y + rng.normal(0, 1.2, 100)
    lo1, hi1 = M.bootstrap_ci(y, s, np.arange(100), n=400)
    # every image repeated 4 times as one patient: same information, so the interval must not shrink
    lo4, hi4 = M.bootstrap_ci(np.repeat(y, 4), np.repeat(s, 4), np.repeat(np.arange(100), 4), n=400)
    assert lo1 < M.roc_auc(y, s) < hi1
    assert (hi4 - lo4) > 0.8 * (hi1 - lo1)


def test_group_resamples_draw_whole_groups_in_the_order_drawn():
    # groups of 1, 2 and 3 images, interleaved and named out of order: "b" = images 0 and 3, "a" = 1,
    # "c" = 2, 4 and 5; np.unique sorts the names, so group 0 is "a", 1 is "b", 2 is "c"
    groups = np.array(["b", "a", "c", "b", "c", "c"])
    y = np.array([0, 1, 0, 1, 0, 1])
    members = {0: [1], 1: [0, 3], 2: [2, 4, 5]}
    rng = np.random.default_rng(11)  # the generator the resamples draw from, replayed
    resamples = list(M._group_resamples(y, groups, 50, seed=11))
    expected = []
    for _ in range(50):
        idx = [i for g in rng.integers(0, 3, 3) for i in members[int(g)]]
        if len(set(y[idx])) == 2:  # one class only: no AUC, left out
            expected.append(idx)
    assert 0 < len(expected) < 50  # both kinds of resample occurred
    assert [r.tolist() for r in resamples] == expected


def test_summarize_over_seeds():
    s = M.summarize([0.8, 0.82, 0.84])
    assert s["mean"] == pytest.approx(0.82) and s["ci_low"] < 0.82 < s["ci_high"] and s["n"] == 3
    assert math.isnan(M.summarize([0.8])["ci_low"])


def test_roc_auc_counts_ties_as_half_and_matches_sklearn():
    # pairs: 0.9 beats all three others (3); 0.5 ties two (0.5 each) and beats 0.1 (1): 5 of 6
    assert M.roc_auc([1, 1, 0, 0, 0], [0.9, 0.5, 0.5, 0.1, 0.5]) == pytest.approx(5 / 6, abs=1e-15)
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.normal(size=500) + y, 1)  # many ties
    assert M.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(M.roc_auc([1, 1], [0.2, 0.3]))
    with pytest.raises(ValueError, match="NaN"):
        M.roc_auc([1, 0], [0.2, float("nan")])
