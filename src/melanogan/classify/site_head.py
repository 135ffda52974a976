"""Refitting the melanoma head on a labelled sample of a new site (`calibrate --refit-head`).

Why: a temperature and a threshold move the operating point but cannot change the ranking, and the
ranking is what fails at another clinic (external ROC-AUC 0.69-0.79 under leave-one-source-out). The
features may still separate the site's melanomas along another direction than the one the training
sources taught the head. Only the last linear layer (features -> melanoma logit) is refitted, on the
site's own labelled cases; the backbone stays as trained, so a few hundred cases are enough.

The fit is anchored to the trained head (L2-SP: Li et al., "Explicit inductive bias for transfer
learning with convolutional networks", 2018): it minimises

    mean BCE(f w + b, y) + lam / 2 * sum_j s_j^2 (w_j - w0_j)^2

where w0 is the trained head and s_j the sample's standard deviation of feature j (so lam means the
same for every feature, as for standardised features). lam = inf keeps the trained head (only the
bias moves), small lam lets the site sample decide. lam is chosen by grouped cross-validation
(log-loss) on the sample, inf among the candidates, so a sample that does not support a change keeps
the trained ranking.

Honesty: a head fitted on cases scores them too well. Every figure `calibrate` reports for a refitted
head (ROC-AUC, temperature, thresholds and their cross-fitted sensitivity/specificity) is computed
from out-of-fold logits: each case scored by a head fitted, lam chosen included, without its group
(nested cross-validation). The head stored for the site is then fitted on the whole sample with the
lam chosen on the whole sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn

from melanogan.classify import metrics as M
from melanogan.errors import MelanoganError

# Candidates for lam, largest first: inf (the trained head) wins ties, then the more anchored fit.
LAMBDAS = (math.inf, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)
# Fewer melanomas (or others) than this per sample give folds with a handful of positives, too few
# to choose lam or to fit hundreds of weights against.
MIN_PER_CLASS = 20
HEAD_FILE = "head.safetensors"


def head_layer(model: nn.Module) -> nn.Linear:
    """The linear layer that makes the melanoma logit (the last of `model.head`)."""
    head = getattr(model, "head", None)
    layer = head[-1] if isinstance(head, nn.Sequential) and len(head) else head
    if not isinstance(layer, nn.Linear) or layer.out_features != 1:
        raise MelanoganError(f"{type(model).__name__} has no single-logit linear head to refit.")
    return layer


@contextmanager
def captured_head_inputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect what reaches the head's linear layer (image features, joined to the metadata
    embedding for a model trained with metadata) during the forward passes inside the block."""
    seen: list[torch.Tensor] = []
    handle = head_layer(model).register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().float().cpu()))
    try:
        yield seen
    finally:
        handle.remove()


def _scales(f: np.ndarray) -> np.ndarray:
    # a feature constant on the sample (a dead ReLU) gets scale 1: its weight then stays near w0
    # instead of trading freely with the bias (which would leave the fit ill-conditioned)
    # scales are floored at a thousandth of the median one: an almost constant feature would otherwise
    # cost almost nothing to weigh heavily, and the fit would crawl along it (ill-conditioned)
    s = f.std(axis=0)
    s = np.where(s > 1e-8, s, 1.0)
    return np.maximum(s, 1e-3 * np.median(s))


def fit_anchored_head(f: np.ndarray, y: np.ndarray, w0: np.ndarray, b0: float, lam: float,
                      scale: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """The (w, b) minimising mean BCE(f w + b, y) + lam/2 * sum_j scale_j^2 (w_j - w0_j)^2 (float64,
    L-BFGS from the trained head with the exact gradient; convex for lam > 0). `scale`: the
    per-feature standard deviations of `f` when None. lam = inf: w = w0 exactly, b by Newton's method."""
    from scipy.optimize import minimize
    from scipy.special import expit

    F, Y = np.asarray(f, dtype=np.float64), np.asarray(y, dtype=np.float64)
    W0 = np.asarray(w0, dtype=np.float64).reshape(-1)
    n = len(Y)
    if math.isinf(lam):  # one unknown: Newton's method converges in a few steps, to rounding
        z0, b = F @ W0, float(b0)
        for _ in range(100):
            p = expit(z0 + b)
            step = (p - Y).mean() / max((p * (1 - p)).mean(), 1e-300)
            b -= step
            if abs(step) < 1e-13:
                break
        return W0.copy(), b
    s2 = (np.asarray(scale, dtype=np.float64) if scale is not None else _scales(F)) ** 2

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:-1], theta[-1]
        z = F @ w + b
        residual = (expit(z) - Y) / n  # d mean-BCE / dz
        dw = w - W0
        loss = float(np.mean(np.logaddexp(0.0, z) - Y * z)) + 0.5 * lam * float((s2 * dw * dw).sum())
        return loss, np.append(F.T @ residual + lam * s2 * dw, residual.sum())

    # at most 300 iterations: on a (nearly) separable sample with small lam the fit creeps on by growing
    # its weights along the separating direction, which changes the ranking no more
    theta = minimize(objective, np.append(W0, float(b0)), jac=True, method="L-BFGS-B",
                     options={"maxiter": 300, "gtol": 1e-8, "ftol": 1e-12, "maxcor": 20}).x
    return theta[:-1].copy(), float(theta[-1])


def _log_loss(z: np.ndarray, y: np.ndarray) -> float:
    # mean BCE with logits, computed stably: log(1 + exp(-|z|)) + max(z, 0) - y z
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def grouped_folds(y: np.ndarray, groups: np.ndarray, folds: int, seed: int,
                  purpose: str = "cross-validate a refitted head") -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs of stratified folds that keep each group (lesion) whole, as many as
    `folds` or the rarer class allows; a fold whose train part holds one class only is left out."""
    n = int(min(folds, y.sum(), (1 - y).sum()))
    if n < 2:
        raise MelanoganError(f"too few cases of one class to {purpose}.")
    splitter = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in splitter.split(np.zeros(len(y)), y, groups) if 0 < y[tr].sum() < len(tr)]


def cross_validated_log_loss(f: np.ndarray, y: np.ndarray, groups: np.ndarray, w0: np.ndarray, b0: float,
                             lambdas=LAMBDAS, folds: int = 5, seed: int = 0) -> dict[float, float]:
    """Each lam's log-loss on held-out groups, mean over grouped stratified folds (each fold's head
    fitted on the others, feature scales from the others)."""
    splits = grouped_folds(y, groups, folds, seed)
    out = {}
    for lam in lambdas:
        losses = []
        for tr, te in splits:
            w, b = fit_anchored_head(f[tr], y[tr], w0, b0, lam)
            losses.append(_log_loss(f[te] @ w + b, y[te]))
        out[lam] = float(np.mean(losses))
    return out


def choose_lambda(losses: dict[float, float]) -> float:
    """The lam of least cross-validated log-loss; a tie goes to the larger lam (the more anchored)."""
    return min(sorted(losses, reverse=True), key=lambda lam: losses[lam])


def refit_head(f: np.ndarray, y: np.ndarray, groups: np.ndarray, w0: np.ndarray, b0: float, lambdas=LAMBDAS,
               folds: int = 5, seed: int = 0) -> dict:
    """The site head (lam chosen by cross-validation on the whole sample, fitted on it) and the
    out-of-fold logits every reported figure must come from (nested: each outer fold's lam chosen and
    head fitted on the other folds only)."""
    f, y, groups = np.asarray(f, dtype=np.float64), np.asarray(y, dtype=np.float64), np.asarray(groups)
    oof = np.full(len(y), np.nan)
    chosen_per_fold = []
    for tr, te in grouped_folds(y, groups, folds, seed):
        lam = choose_lambda(cross_validated_log_loss(f[tr], y[tr], groups[tr], w0, b0, lambdas, folds, seed))
        w, b = fit_anchored_head(f[tr], y[tr], w0, b0, lam)
        oof[te] = f[te] @ w + b
        chosen_per_fold.append(lam)
    if np.isnan(oof).any():  # a fold skipped for holding one class only: its cases have no honest score
        raise MelanoganError("a cross-validation fold of the site sample held one class only; label more cases of "
                             "the rarer class.")
    losses = cross_validated_log_loss(f, y, groups, w0, b0, lambdas, folds, seed)
    lam = choose_lambda(losses)
    w, b = fit_anchored_head(f, y, w0, b0, lam)
    return {"weight": w, "bias": b, "lambda": lam, "cv_log_loss": losses, "lambda_per_outer_fold": chosen_per_fold,
            "out_of_fold_logits": oof}


def json_lambda(lam: float) -> float | str:
    return "inf" if math.isinf(lam) else lam


# A benign diagnosis the refitted head ranks this much worse against melanoma than the trained head
# (its out-of-fold logits against the trained head's, on the same images) is named in a note: measured with HAM10000
# held out, the refit took naevi 0.711 -> 0.842 and the 38 basal cell carcinomas 0.949 -> 0.771.
RANKS_WORSE = 0.05


def by_diagnosis(y: np.ndarray, trained: np.ndarray, refitted: np.ndarray, diagnosis: np.ndarray,
                 min_images: int = 5, groups: np.ndarray | None = None, bootstrap: int = 1000,
                 seed: int = 0) -> list[dict]:
    """Per benign diagnosis of the site sample with at least `min_images` images: the ROC-AUC of all
    the sample's melanomas against it alone, by the trained head's logits and by the refitted head's
    (out-of-fold) logits, and the 95% CI of refitted - trained by a paired bootstrap of `bootstrap`
    resamples of whole `groups` (patients/lesions; each image its own group when None) of those images
    (`difference_ci95`; None with bootstrap 0, or when too few resamples hold both classes). Why: the
    refitted head learns the sample's case mix; its overall AUC can rise while a rarer benign group is
    ranked worse, which a site whose next cases hold more of that group would pay for, and a group of
    a few dozen images moves by chance alone. Missing diagnoses count as "unknown" (as in
    evaluate.diagnosis_table). Rows: most images first, then by name."""
    y = np.asarray(y).astype(int)
    trained, refitted = np.asarray(trained, dtype=np.float64), np.asarray(refitted, dtype=np.float64)
    dx = np.asarray(pd.Series(diagnosis, dtype="string").fillna("unknown"), dtype=object)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    melanomas = np.flatnonzero(y == 1)
    rows = []
    for value in sorted(set(dx[y == 0])):
        idx = np.flatnonzero((dx == value) & (y == 0))
        if len(idx) < min_images or not len(melanomas):
            continue
        both = np.concatenate([melanomas, idx])
        ci = None
        if bootstrap:
            d = M.paired_bootstrap_auc_difference(y[both], [refitted[both]], [trained[both]], groups[both],
                                                  n=bootstrap, seed=seed)
            ci = None if math.isnan(d["ci_low"]) else [d["ci_low"], d["ci_high"]]
        rows.append({"diagnosis": str(value), "n_images": len(idx),
                     "roc_auc_trained_head": M.roc_auc(y[both], trained[both]),
                     "roc_auc_refitted_head": M.roc_auc(y[both], refitted[both]), "difference_ci95": ci})
    return sorted(rows, key=lambda r: (-r["n_images"], r["diagnosis"]))


def difference_ci(row: dict) -> str:
    """", difference 95% CI [lo, hi]" for a by_diagnosis row that has one, else ""."""
    ci = row.get("difference_ci95")
    return f", difference 95% CI [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""


def ranks_worse_notes(rows: list[dict], min_images: int = MIN_PER_CLASS, margin: float = RANKS_WORSE) -> list[str]:
    """A note for each diagnosis of `by_diagnosis` with at least `min_images` images that the refitted
    head ranks at least `margin` worse against melanoma than the trained head (fewer images: too
    noisy to name). Where the difference's CI reaches zero the note says the sample cannot tell the
    loss from chance, instead of stating it: a group of a few dozen images moves by 0.05 by chance."""
    notes = []
    for r in rows:
        if r["n_images"] < min_images or r["roc_auc_trained_head"] - r["roc_auc_refitted_head"] < margin:
            continue
        ci = r.get("difference_ci95")
        uncertain = ci is not None and ci[1] >= 0
        verb = "may rank" if uncertain else "ranks"
        tail = ("; the CI reaches no change, so this sample cannot tell that loss from chance: label more of "
                "them to find out." if uncertain else
                ": it follows the sample's case mix. If the site's next cases hold more of them than the sample, "
                "label a sample like them, or calibrate with --no-refit-head.")
        notes.append(f"the refitted head {verb} the sample's {r['diagnosis']} ({r['n_images']} images) worse against "
                     f"melanoma than the trained head (ROC-AUC {r['roc_auc_trained_head']:.3f} -> "
                     f"{r['roc_auc_refitted_head']:.3f}{difference_ci(r)}){tail}")
    return notes
