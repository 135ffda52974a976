"""Test-time augmentation: exact views, invariance, and its wiring into evaluate and predict."""

from __future__ import annotations

import pytest
import torch

from melanogan.classify.tta import VIEWS, tta_logits
from melanogan.errors import MelanoganError


def test_the_eight_views_are_the_distinct_symmetries_of_the_square():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    views = [view(x) for _, view in VIEWS]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    assert views[1][0, 0, 0].tolist() == [2.0, 1.0, 0.0]  # hflip
    assert views[4][0, 0].tolist() == [[2.0, 5.0, 8.0], [1.0, 4.0, 7.0], [0.0, 3.0, 6.0]]  # rot90 (counter-clockwise)


def test_tta_of_a_flip_invariant_model_equals_the_plain_prediction():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    model = lambda t: (t ** 2).mean(dim=(1, 2, 3))  # noqa: E731  pointwise, then a global mean
    for n in (2, 4, 8):
        assert torch.allclose(tta_logits(model, x, n), model(x), atol=1e-6)


def test_tta_averages_logits_over_the_views():
    x = torch.rand(2, 1, 5, 5)
    corner = lambda t: t[:, 0, 0, 0]  # noqa: E731  a model that only looks at the top-left pixel
    corners = torch.stack([x[:, 0, 0, 0], x[:, 0, 0, -1], x[:, 0, -1, 0], x[:, 0, -1, -1]])
    assert torch.allclose(tta_logits(corner, x, 2), (x[:, 0, 0, 0] + x[:, 0, 0, -1]) / 2)
    assert torch.allclose(tta_logits(corner, x, 4), corners.mean(0))
    assert torch.allclose(tta_logits(corner, x, 8), corners.mean(0))  # each corner comes up twice in D4
    with pytest.raises(MelanoganError, match="--tta 3"):
        tta_logits(corner, x, 3)
