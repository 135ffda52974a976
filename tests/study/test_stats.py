"""The study's statistics on fabricated predictions with known outcomes: exact values, milliseconds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from melanogan.classify import metrics as M
from melanogan.study.stats import compare_with_baseline, verdict


def test_holm_adjusts_in_order_monotone_and_capped():
    # sorted 0.01, 0.02, 0.04 of m=3: 0.03, 0.04, 0.04 (monotone), original order kept; NaN not counted
    assert M.holm([0.04, 0.01, float("nan"), 0.02]) == pytest.approx([0.04, 0.03, float("nan"), 0.04], nan_ok=True)
    assert M.holm([0.5, 0.6]) == [1.0, 1.0]
    assert M.holm([]) == []


def test_paired_bootstrap_is_exact_when_the_difference_never_changes_sign():
    y = np.array([0, 0, 1, 1, 0, 1] * 5)
    groups = np.repeat(np.arange(10), 3)
    perfect = y + 0.1 * np.arange(30) / 30  # ranks every melanoma above every other image
    reverse = -perfect  # AUC 0
    r = M.paired_bootstrap_auc_difference(y, [perfect], [reverse], groups, n=200, seed=0)
    assert r["difference"] == 1.0 and r["ci_low"] == pytest.approx(1.0) and r["ci_high"] == pytest.approx(1.0)
    assert r["p_value"] == pytest.approx(2 / 201 * 1)  # no replicate at or below 0: (0 + 1) / (n + 1), doubled
    same = M.paired_bootstrap_auc_difference(y, [perfect], [perfect], groups, n=200, seed=0)
    assert same["difference"] == 0.0 and same["p_value"] == 1.0


def _preds(y, scores, groups):
    return pd.DataFrame({"uid": [f"i{k}" for k in range(len(y))], "label": y, "group": groups, "logit": scores})


def _case(seeds=(0,), n=300, effect=0.0, seed=0):
    """Baseline scores with AUC ~0.75; the arm adds `effect` x label (a better or worse model)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    groups = [f"g{k // 2}" for k in range(n)]  # two images per lesion
    preds = {}
    for s in seeds:
        noise = rng.normal(size=n)
        base = y * 1.0 + noise
        preds[(s, "baseline")] = _preds(y, base, groups)
        preds[(s, "arm")] = _preds(y, base + effect * y + 0.05 * rng.normal(size=n), groups)
        preds[(s, "same")] = _preds(y, base + 0.05 * rng.normal(size=n), groups)
    return preds


@pytest.mark.parametrize(("effect", "direction"), [(1.5, "better"), (-1.5, "worse"), (0.0, "none")])
@pytest.mark.parametrize("seeds", [(0,), (0, 1, 2)])
def test_verdicts_on_known_outcomes(effect, direction, seeds):
    rows = compare_with_baseline(["baseline", "arm"], list(seeds), _case(seeds, effect=effect), n_bootstrap=300)
    (row,) = rows
    assert row["seeds"] == len(seeds) and row["direction"] == direction
    assert row["significant"] == (direction != "none")
    assert row["p_holm"] == row["p_value"]  # one comparison: nothing to adjust
    if direction != "none":
        assert row["p_value"] < 0.01 and (row["ci_low"] > 0 if effect > 0 else row["ci_high"] < 0)
        assert row["verdict"].startswith(direction.capitalize() + " than baseline")
    else:
        assert row["ci_low"] < 0 < row["ci_high"] and row["verdict"].startswith("Not significant")
    if len(seeds) > 1:
        assert row["seed_mean_difference"] == pytest.approx(np.mean(row["per_seed_difference"]))
        assert row["seed_ci_low"] < row["seed_mean_difference"] < row["seed_ci_high"]
    else:
        assert math.isnan(row["seed_ci_low"])
    assert len(row["delong_p_values"]) == len(seeds)


def test_several_arms_are_holm_adjusted_and_the_verdict_uses_the_adjusted_p():
    preds = _case((0,), effect=1.5)
    rows = {r["arm"]: r for r in compare_with_baseline(["baseline", "arm", "same"], [0], preds, n_bootstrap=300)}
    raw = [rows["arm"]["p_value"], rows["same"]["p_value"]]
    assert [rows["arm"]["p_holm"], rows["same"]["p_holm"]] == pytest.approx(M.holm(raw))
    # a raw p just under 0.05 that Holm lifts over it is not significant
    v = verdict("x", 0.02, 0.001, 0.04, p_adjusted=0.06, n_seeds=1)
    assert not v["significant"] and v["text"].startswith("Not significant") and "0.06" in v["text"]
    assert verdict("x", 0.02, 0.001, 0.04, p_adjusted=0.049, n_seeds=3)["direction"] == "better"
    assert verdict("x", -0.02, -0.04, -0.001, p_adjusted=0.01, n_seeds=3)["text"].startswith("Worse")
    assert verdict("x", float("nan"), float("nan"), float("nan"), float("nan"), 1)["direction"] == "untested"
