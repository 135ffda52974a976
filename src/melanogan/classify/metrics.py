"""Clinical metrics as pure functions of labels (0/1) and scores (probabilities or logits).

Thresholds are always chosen on validation data and then applied to test data: a threshold tuned
on the test set (or a fixed 0.5 on a badly calibrated model) is how "recall 12% -> 100%" happens.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, stats
from sklearn.metrics import average_precision_score


def _arrays(y, s) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(int).ravel()
    s = np.asarray(s, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.shape}) and scores ({s.shape}) differ in length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return y, s


def _both_classes(y: np.ndarray) -> bool:
    return 0 < y.sum() < len(y)


def roc_auc(y, s) -> float:
    """ROC-AUC as the Mann-Whitney statistic: the chance that a random melanoma scores above a random
    other image, ties counting half; the value sklearn's roc_auc_score gives, from average ranks.
    Why not sklearn's: the grouped bootstraps call this thousands of times, and its input checks made
    a replicate cost ~10 ms against ~0.2 ms here. NaN when `y` holds one class."""
    y, s = _arrays(y, s)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if not _both_classes(y):
        return float("nan")
    pos = y == 1
    n_pos = int(pos.sum())
    rank_sum = float(stats.rankdata(s)[pos].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * (len(y) - n_pos))


def roc_auc_by_group(y, s, groups) -> dict[str, float]:
    """ROC-AUC within each group (e.g. each training source's validation images), for the groups that
    hold both classes; a group with one class has no AUC and is left out, not scored NaN."""
    y, s = _arrays(y, s)
    groups = np.asarray(groups).astype(str).ravel()
    if groups.shape != y.shape:
        raise ValueError(f"labels ({y.shape}) and groups ({groups.shape}) differ in length")
    return {g: roc_auc(y[groups == g], s[groups == g])
            for g in sorted(set(groups)) if _both_classes(y[groups == g])}


def worst_group_auc(y, s, groups) -> float:
    """The lowest per-group ROC-AUC (groups with both classes). Why: a pooled AUC over several sources
    is dominated by the largest one and also rewards ranking the sources apart (one source's melanomas
    above another's naevi); the worst source is a stand-in for "a source not trained on" that the
    training sources themselves provide. NaN when no group holds both classes."""
    return min(roc_auc_by_group(y, s, groups).values(), default=float("nan"))


def pr_auc(y, s) -> float:
    """Average precision (area under the precision-recall curve, step interpolation)."""
    y, s = _arrays(y, s)
    return float(average_precision_score(y, s)) if _both_classes(y) else float("nan")


def confusion_at(y, s, threshold: float) -> dict[str, float]:
    """Decision `score >= threshold` -> counts and the usual rates (NaN where undefined)."""
    y, s = _arrays(y, s)
    pred = s >= threshold
    tp = int((pred & (y == 1)).sum())
    fp = int((pred & (y == 0)).sum())
    tn = int((~pred & (y == 0)).sum())
    fn = int((~pred & (y == 1)).sum())

    def div(a: float, b: float) -> float:
        return a / b if b else float("nan")

    sens, spec = div(tp, tp + fn), div(tn, tn + fp)
    precision = div(tp, tp + fp)
    return {"threshold": float(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "accuracy": div(tp + tn, len(y)), "precision": precision, "recall": sens, "sensitivity": sens,
            "specificity": spec, "npv": div(tn, tn + fn),
            "f1": div(2 * precision * sens, precision + sens) if not math.isnan(precision) else float("nan"),
            "balanced_accuracy": (sens + spec) / 2}


def threshold_youden(y, s) -> float:
    """The score threshold maximising Youden's J = sensitivity + specificity - 1 (ties: the higher)."""
    y, s = _arrays(y, s)
    if not _both_classes(y):
        return float("nan")
    candidates = np.unique(s)
    best_t, best_j = candidates[-1], -np.inf
    pos, neg = s[y == 1], s[y == 0]
    for t in candidates[::-1]:
        j = (pos >= t).mean() + (neg < t).mean() - 1
        if j > best_j + 1e-12:
            best_t, best_j = t, j
    return float(best_t)


def threshold_for_sensitivity(y, s, target: float = 0.95) -> float:
    """The highest threshold whose sensitivity (score >= t) is at least `target`."""
    y, s = _arrays(y, s)
    pos = np.sort(s[y == 1])[::-1]
    if len(pos) == 0:
        return float("nan")
    k = max(1, math.ceil(target * len(pos) - 1e-9))
    return float(pos[k - 1])


def validation_thresholds(y, p) -> dict[str, float]:
    """The named operating points chosen on validation labels and scores: Youden's J and 95% sensitivity."""
    return {"val-youden": threshold_youden(y, p), "val-sens95": threshold_for_sensitivity(y, p, 0.95)}


def specificity_at_sensitivity(y, s, target: float) -> float:
    t = threshold_for_sensitivity(y, s, target)
    return confusion_at(y, s, t)["specificity"] if not math.isnan(t) else float("nan")


def sensitivity_at_specificity(y, s, target: float) -> float:
    """Sensitivity at the lowest threshold whose specificity (score < t for negatives) is >= target."""
    y, s = _arrays(y, s)
    neg = np.sort(s[y == 0])
    if len(neg) == 0 or not (y == 1).any():
        return float("nan")
    k = math.ceil(target * len(neg) - 1e-9)  # at least k negatives must fall below t
    t = np.nextafter(neg[k - 1], np.inf) if k >= 1 else -np.inf
    return float((s[y == 1] >= t).mean())


def clopper_pearson(correct: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial confidence interval for a proportion; (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    alpha = 1 - level
    low = 0.0 if correct == 0 else float(stats.beta.ppf(alpha / 2, correct, n - correct + 1))
    high = 1.0 if correct == n else float(stats.beta.ppf(1 - alpha / 2, correct + 1, n - correct))
    return low, high


def brier(y, p) -> float:
    y, p = _arrays(y, p)
    return float(np.mean((p - y) ** 2))


def reliability(y, p, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Per equal-width probability bin: count, mean predicted probability, observed melanoma rate."""
    y, p = _arrays(y, p)
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(idx, weights=p, minlength=n_bins) / count
        rate = np.bincount(idx, weights=y, minlength=n_bins) / count
    return {"edges": edges, "count": count, "confidence": conf, "observed": rate}


def expected_calibration_error(y, p, n_bins: int = 10) -> float:
    """ECE = sum over bins of (bin size / N) * |observed rate - mean predicted probability|."""
    r = reliability(y, p, n_bins)
    mask = r["count"] > 0
    return float(np.sum(r["count"][mask] / r["count"].sum() * np.abs(r["observed"][mask] - r["confidence"][mask])))


def sigmoid(x) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=float)))


def fit_temperature(logits, y) -> float:
    """Temperature T minimising the validation negative log-likelihood of sigmoid(logit / T)."""
    y, z = _arrays(y, logits)

    def nll(log_t: float) -> float:
        zt = z / math.exp(log_t)
        return float(np.mean(np.logaddexp(0, zt) - y * zt))

    res = optimize.minimize_scalar(nll, bounds=(-4, 4), method="bounded")
    return float(math.exp(res.x))


def case_mix_auc(y, s, kinds, mix: dict[str, float], min_per_kind: int = 1) -> tuple[float, float]:
    """ROC-AUC with the negatives re-weighted to another case mix `mix` (kind -> share): the mean of
    the per-kind AUCs (all positives against the negatives of one kind) weighted by `mix`. Why: the
    ordinary AUC is exactly that mean weighted by the negatives' own shares (each positive-negative
    pair counts once), so a site whose benign images are mostly keratoses and carcinomas scores lower
    than one of mostly naevi with the same model, by case mix alone; re-weighted to one mix, two
    sites compare on their pictures. Kinds of `mix` with fewer than `min_per_kind` negatives here
    cannot be estimated and drop out (the others renormalised). Returns (AUC, the share of `mix`
    covered); (NaN, 0) without positives or covered kinds."""
    y, s = _arrays(y, s)
    kinds = np.asarray(kinds).astype(str).ravel()
    if kinds.shape != y.shape:
        raise ValueError(f"labels ({y.shape}) and kinds ({kinds.shape}) differ in length")
    pos = y == 1
    total = sum(w for w in mix.values() if w > 0)
    if not pos.any() or total <= 0:
        return float("nan"), 0.0
    weighted = covered = 0.0
    for kind, weight in mix.items():
        negatives = (~pos) & (kinds == kind)
        if weight <= 0 or negatives.sum() < min_per_kind:
            continue
        keep = pos | negatives
        weighted += weight * roc_auc(y[keep], s[keep])
        covered += weight
    if covered == 0:
        return float("nan"), 0.0
    return weighted / covered, covered / total


def bootstrap_ci(y, s, groups, metric=roc_auc, n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of `metric`, resampling whole groups (patients) with replacement: images of one
    patient are correlated, so resampling images would understate the uncertainty."""
    y, s = _arrays(y, s)
    values = [metric(y[idx], s[idx]) for idx in _group_resamples(y, groups, n, seed)]
    if len(values) < n // 2:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def _group_resamples(y: np.ndarray, groups, n: int, seed: int):
    """Index arrays of `n` bootstrap resamples of whole groups drawn with replacement (each drawn
    group's images in ascending order, the groups in the order drawn); resamples with one class only
    (no AUC) are left out.

    Why vectorised: concatenating one small array per drawn group cost ~1.2 ms a resample on a
    2,600-image report part (twice the two AUCs it feeds); the images sorted by group and one gather
    give the same indices at a tenth of that."""
    inverse = np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
    order = np.argsort(inverse, kind="stable")  # every group's images together, ascending
    counts = np.bincount(inverse)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rng = np.random.default_rng(seed)
    for _ in range(n):
        drawn = rng.integers(0, len(counts), len(counts))
        lengths = counts[drawn]
        # position j of the k-th drawn group's run: its start + j, written as one arange shifted per run
        shift = np.repeat(starts[drawn] - (np.cumsum(lengths) - lengths), lengths)
        idx = order[np.arange(int(lengths.sum())) + shift]
        if _both_classes(y[idx]):
            yield idx


def _midrank(x: np.ndarray) -> np.ndarray:
    return stats.rankdata(x, method="average")


def delong_covariance(y, *scores) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their DeLong covariance matrix for correlated ROC curves on the same cases
    (fast algorithm of Sun & Xu 2014)."""
    y = np.asarray(y).astype(int)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    m, n = len(pos), len(neg)
    aucs, v10, v01 = [], [], []
    for s in scores:
        s = np.asarray(s, dtype=float)
        tx, ty, tz = _midrank(s[pos]), _midrank(s[neg]), _midrank(np.concatenate([s[pos], s[neg]]))
        aucs.append((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tz[:m] - tx) / n)
        v01.append(1.0 - (tz[m:] - ty) / m)
    v10, v01 = np.array(v10), np.array(v01)
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return np.array(aucs), cov


def delong_test(y, s1, s2) -> dict[str, float]:
    """Paired DeLong test of AUC(s1) vs AUC(s2) on the same cases: difference, its 95% CI, p-value."""
    y, _ = _arrays(y, s1)
    aucs, cov = delong_covariance(y, s1, s2)
    diff = aucs[0] - aucs[1]
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    se = math.sqrt(max(var, 0.0))
    z = diff / se if se > 0 else 0.0
    p = 2 * stats.norm.sf(abs(z)) if se > 0 else 1.0
    return {"auc_1": float(aucs[0]), "auc_2": float(aucs[1]), "difference": float(diff), "se": se,
            "ci_low": float(diff - 1.96 * se), "ci_high": float(diff + 1.96 * se), "z": float(z), "p_value": float(p)}


def summarize(values, level: float = 0.95) -> dict[str, float]:
    """Mean and t-based CI over seeds (NaN-safe; a single value has no interval)."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    if len(v) == 1:
        return {"mean": float(v[0]), "ci_low": float("nan"), "ci_high": float("nan"), "n": 1}
    half = stats.t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return {"mean": float(v.mean()), "ci_low": float(v.mean() - half), "ci_high": float(v.mean() + half), "n": len(v)}


def paired_bootstrap_auc_difference(y, scores_a, scores_b, groups, n: int = 1000, seed: int = 0,
                                    level: float = 0.95) -> dict[str, float]:
    """Paired grouped bootstrap of AUC(a) - AUC(b) on the same cases, pooled over runs.

    `scores_a` and `scores_b` are lists (one entry per seed/run) of score arrays for the same cases
    `y`/`groups`. Each replicate resamples whole groups (patients/lesions: their images are
    correlated, which DeLong ignores) once, and takes the mean over runs of the AUC differences on
    that resample. Returns the observed mean difference, the percentile CI and a two-sided p-value
    ((k + 1) / (n + 1) with k the replicates on the far side of 0, doubled, at most 1)."""
    y = np.asarray(y).astype(int).ravel()
    a = [np.asarray(s, dtype=float).ravel() for s in scores_a]
    b = [np.asarray(s, dtype=float).ravel() for s in scores_b]
    if len(a) != len(b) or not a or any(len(s) != len(y) for s in a + b):
        raise ValueError("scores_a and scores_b need one score array per run, each as long as y")
    observed = float(np.mean([roc_auc(y, sa) - roc_auc(y, sb) for sa, sb in zip(a, b, strict=True)]))
    values = [np.mean([roc_auc(y[idx], sa[idx]) - roc_auc(y[idx], sb[idx])
                       for sa, sb in zip(a, b, strict=True)]) for idx in _group_resamples(y, groups, n, seed)]
    if len(values) < n // 2:
        return {"difference": observed, "ci_low": float("nan"), "ci_high": float("nan"), "p_value": float("nan"),
                "replicates": len(values)}
    v = np.asarray(values)
    lo, hi = np.percentile(v, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    far = min(int((v <= 0).sum()), int((v >= 0).sum()))
    p = min(1.0, 2 * (far + 1) / (len(v) + 1))
    return {"difference": observed, "ci_low": float(lo), "ci_high": float(hi), "p_value": float(p),
            "replicates": len(v)}


def holm(p_values) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given; NaN stays NaN and is not counted):
    the i-th smallest of m is multiplied by (m - i + 1), made monotone, capped at 1."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(len(p), np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()
