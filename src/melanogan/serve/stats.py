"""Statistics for human review: how well does a reviewer tell real from synthetic images?"""

from __future__ import annotations

from dataclasses import dataclass

from scipy import stats

from melanogan.classify.metrics import clopper_pearson


@dataclass(frozen=True)
class Accuracy:
    """`correct` of `n` answers, with an exact (Clopper-Pearson) 95% CI and a two-sided binomial test
    against chance (p = 0.5: a reviewer who cannot tell real from synthetic)."""

    correct: int
    n: int
    low: float
    high: float
    p_value: float

    @property
    def value(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    @property
    def verdict(self) -> str:
        if self.n == 0:
            return "no answers yet"
        if self.low > 0.5:
            return "better than chance: tells real from synthetic"
        if self.high < 0.5:
            return "worse than chance: systematically fooled"
        return f"not distinguishable from chance (50%) with {self.n} answers"


def accuracy(correct: int, n: int) -> Accuracy:
    """Accuracy with its exact 95% CI and the p-value of "no better than a coin"."""
    if not 0 <= correct <= n:
        raise ValueError(f"correct={correct} must be between 0 and n={n}")
    low, high = clopper_pearson(correct, n)
    p = float(stats.binomtest(correct, n, 0.5).pvalue) if n else 1.0
    return Accuracy(correct=correct, n=n, low=low, high=high, p_value=p)
