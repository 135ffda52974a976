"""Reviewer accuracy statistics: exact values on tiny inputs."""

from __future__ import annotations

import pytest

from melanogan.serve.stats import accuracy, clopper_pearson


def test_clopper_pearson_known_values():
    # Reference values (R: binom.test(5, 10)$conf.int; binom.test(0, 10)$conf.int)
    assert clopper_pearson(5, 10) == pytest.approx((0.1870860, 0.8129140), abs=1e-6)
    assert clopper_pearson(0, 10) == pytest.approx((0.0, 0.3084971), abs=1e-6)
    assert clopper_pearson(10, 10) == pytest.approx((0.6915029, 1.0), abs=1e-6)
    assert clopper_pearson(0, 0) == (0.0, 1.0)


def test_binomial_test_and_verdicts():
    coin = accuracy(5, 10)
    assert coin.value == 0.5 and coin.p_value == pytest.approx(1.0)
    assert "not distinguishable from chance" in coin.verdict
    sharp = accuracy(9, 10)
    assert sharp.p_value == pytest.approx(22 / 1024)  # two-sided: P(X >= 9) + P(X <= 1) for n = 10
    assert sharp.low > 0.5 and sharp.verdict.startswith("better than chance")
    fooled = accuracy(2, 20)
    assert fooled.high < 0.5 and fooled.verdict.startswith("worse than chance")
    assert accuracy(0, 0).verdict == "no answers yet"
    with pytest.raises(ValueError):
        accuracy(3, 2)
