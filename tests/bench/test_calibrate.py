"""The adaptation-size curve of `bench calibrate`: each draw adapts from the model's own statistics,
the whole pool once, and the model is given back unchanged."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from melanogan.bench.calibrate import adaptation_curve
from melanogan.classify import metrics as M
from melanogan.classify.adapt import adapt_batchnorm, batchnorm_statistics
from melanogan.classify.models import create_classifier
from melanogan.classify.train import predict_logits


def test_adaptation_curve_draws_from_the_pool_and_gives_the_model_back():
    torch.manual_seed(0)
    model = create_classifier("small-cnn", 16).eval()
    own = batchnorm_statistics(model)
    pool = TensorDataset(3 * torch.rand(12, 3, 16, 16), torch.zeros(12))
    y = np.array([1, 0] * 5)
    report = TensorDataset(3 * torch.rand(10, 3, 16, 16) + torch.as_tensor(y).view(-1, 1, 1, 1) * 0.5,
                           torch.as_tensor(y))
    rows = adaptation_curve(model, pool, report, y, sizes=(4, 8, 64), repeats=3)
    assert [(r["n"], r["draws"]) for r in rows] == [(4, 3), (8, 3), (12, 1)]  # 64 > the pool: dropped
    by_hand = copy.deepcopy(model)
    adapt_batchnorm(by_hand, [(pool.tensors[0], None)])
    assert rows[-1]["auc_median"] == pytest.approx(M.roc_auc(y, predict_logits(by_hand, report)), abs=1e-4)
    assert all(r["auc_min"] <= r["auc_median"] <= r["auc_max"] for r in rows)
    assert all(torch.equal(batchnorm_statistics(model)[k], v) for k, v in own.items())


def test_head_curve_refits_on_each_draw_and_skips_draws_calibrate_would_refuse():
    from melanogan.bench.calibrate import head_curve
    from melanogan.classify.site_head import refit_head

    rng = np.random.default_rng(0)

    def site(n):  # at this site feature 1 separates melanomas; the trained head reads feature 0 only
        y = (np.arange(n) % 4 == 0).astype(int)
        f = rng.normal(size=(n, 3))
        f[:, 1] += 2.0 * y
        return f, y

    f_pool, y_pool = site(200)
    f_rep, y_rep = site(200)
    groups = np.arange(200).astype(str)
    w0 = np.array([1.0, 0.0, 0.0])
    rows = head_curve(f_pool, y_pool, groups, f_rep, y_rep, w0, 0.0, sizes=(40, 120), repeats=2)
    # 40 images hold 10 melanomas, fewer than calibrate's 20: never fitted, so no row
    assert [(r["n"], r["draws"], r["skipped"]) for r in rows] == [(120, 2, 0), (200, 1, 0)]
    whole = refit_head(f_pool, y_pool, groups, w0, 0.0)
    assert rows[-1]["auc_median"] == pytest.approx(M.roc_auc(y_rep, f_rep @ whole["weight"] + whole["bias"]),
                                                   abs=1e-4)
    assert M.roc_auc(y_rep, f_rep @ w0) < 0.6 < 0.85 < min(r["auc_min"] for r in rows)
