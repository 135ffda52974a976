"""The study's statistics: every arm against the baseline, as pure functions of predictions.

Primary test: a paired bootstrap of the ROC-AUC difference that resamples patient/lesion clusters
(images of one lesion are correlated; DeLong assumes independent images and so understates the
uncertainty), pooled over seeds. With several arms tested against one baseline, the p-values are
Holm-adjusted and the verdict uses the adjusted ones. DeLong per seed stays as a secondary view,
and with several seeds the mean difference gets a seed-level t interval as well.
"""

from __future__ import annotations

import math

from melanogan.classify import metrics as M

ALPHA = 0.05


def verdict(arm: str, difference: float, ci_low: float, ci_high: float, p_adjusted: float, n_seeds: int,
            alpha: float = ALPHA) -> dict:
    """Significant or not (Holm-adjusted p < alpha), the direction, and a plain-language sentence."""
    seeds = f"{n_seeds} seed{'s' if n_seeds != 1 else ''}"
    interval = f"{difference:+.3f}, 95% CI {ci_low:+.3f} to {ci_high:+.3f}"
    if math.isnan(p_adjusted):
        return {"significant": False, "direction": "untested",
                "text": f"Not tested: the test split has too few melanomas or groups to compare {arm} with baseline."}
    if p_adjusted < alpha:
        direction = "better" if difference > 0 else "worse"
        return {"significant": True, "direction": direction,
                "text": f"{direction.capitalize()} than baseline: the ROC-AUC difference ({interval}; {seeds}) is "
                        f"significant after Holm adjustment (p = {p_adjusted:.3g})."}
    return {"significant": False, "direction": "none",
            "text": f"Not significant: the ROC-AUC difference ({interval}; {seeds}; Holm-adjusted p = "
                    f"{p_adjusted:.3g}) does not show that {arm} changes discrimination."}


def compare_with_baseline(arms: list[str], seeds: list[int], preds: dict, n_bootstrap: int = 1000,
                          seed: int = 0) -> list[dict]:
    """Every arm vs baseline on the same test images. `preds[(seed, arm)]`: a predictions table with
    uid, label, group (patient/lesion cluster) and logit. Returns one row per arm with the pooled
    grouped-bootstrap test, Holm-adjusted p, the seed-level interval, DeLong per seed and a verdict."""
    rows = []
    for arm in arms:
        if arm == "baseline":
            continue
        pairs = [(s, preds[(s, arm)], preds[(s, "baseline")]) for s in seeds
                 if (s, arm) in preds and (s, "baseline") in preds]
        if not pairs:
            continue
        # The same images in every seed (one test split): align every run on the first one's order.
        order = pairs[0][1][["uid", "label", "group"]]
        a_scores, b_scores, per_seed = [], [], []
        for _, a, b in pairs:
            merged = order.merge(a[["uid", "logit"]], on="uid").merge(b[["uid", "logit"]], on="uid",
                                                                      suffixes=("", "_base"))
            if len(merged) != len(order):
                raise ValueError(f"{arm}: the runs were not evaluated on the same test images")
            a_scores.append(merged["logit"].to_numpy())
            b_scores.append(merged["logit_base"].to_numpy())
            per_seed.append(M.delong_test(merged["label"], merged["logit"], merged["logit_base"]))
        boot = M.paired_bootstrap_auc_difference(order["label"], a_scores, b_scores, order["group"],
                                                 n=n_bootstrap, seed=seed)
        diffs = [d["difference"] for d in per_seed]
        seed_level = M.summarize(diffs)
        rows.append({"arm": arm, "seeds": len(pairs), "difference": boot["difference"],
                     "ci_low": boot["ci_low"], "ci_high": boot["ci_high"], "p_value": boot["p_value"],
                     "seed_mean_difference": seed_level["mean"], "seed_ci_low": seed_level["ci_low"],
                     "seed_ci_high": seed_level["ci_high"], "per_seed_difference": diffs,
                     "delong_p_values": [d["p_value"] for d in per_seed]})
    for row, p_adj in zip(rows, M.holm([r["p_value"] for r in rows]), strict=True):
        row["p_holm"] = p_adj
        v = verdict(row["arm"], row["difference"], row["ci_low"], row["ci_high"], p_adj, row["seeds"])
        row.update(significant=v["significant"], direction=v["direction"], verdict=v["text"])
    return rows

