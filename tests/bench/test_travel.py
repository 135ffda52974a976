"""bench travel's lever comparison: paired on the same report images, exact on constructed scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from melanogan.bench.travel import _paired, run
from melanogan.errors import DataError


def test_lever_difference_is_paired_on_the_images_both_runs_scored():
    rng = np.random.default_rng(0)
    n = 200
    label = np.r_[np.ones(40, int), np.zeros(n - 40, int)]
    first = pd.DataFrame({"uid": [f"u{i}" for i in range(n)], "label": label, "group": [f"g{i // 2}" for i in range(n)],
                          "logit": rng.normal(size=n) + 0.5 * label})
    better = first.assign(logit=first["logit"] + 2.0 * label)  # the lever separates the classes more
    extra = pd.DataFrame({"uid": ["only-in-one"], "label": [1], "group": ["x"], "logit": [9.0]})
    result = _paired(first, pd.concat([better, extra], ignore_index=True))
    from sklearn.metrics import roc_auc_score

    expected = roc_auc_score(label, better["logit"]) - roc_auc_score(label, first["logit"])
    assert result["images"] == n and result["difference"] == pytest.approx(expected, abs=1e-4)
    assert result["ci95"][0] > 0 and result["p_value"] < 0.01
    same = _paired(first, first)
    assert same["difference"] == 0 and same["p_value"] == 1.0


def test_an_unknown_lever_value_fails_before_any_work(tmp_path):
    for folder in ("ham10000_224", "isic9_180", "derm7pt_384"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    with pytest.raises(DataError, match="resize mode 'zoom' is unknown"):
        run(tmp_path, resize_mode="crop,zoom")
