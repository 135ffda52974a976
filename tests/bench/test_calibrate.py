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
