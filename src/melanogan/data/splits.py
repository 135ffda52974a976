"""Leak-free train/val/test splits: grouped by cluster (patient, lesion, near-duplicate), stratified
by label, deterministic for a seed, and stable: rows that already have a split keep it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from melanogan.errors import DataError

SPLITS = ("train", "val", "test")
UNLABELED = "unlabeled"


@dataclass(frozen=True)
class SplitFractions:
    train: float = 0.70
    val: float = 0.15
    test: float = 0.15

    def __post_init__(self) -> None:
        values = (self.train, self.val, self.test)
        if any(v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-6 or self.train <= 0:
            raise DataError(f"split fractions train={self.train}, val={self.val}, test={self.test} must be "
                            "non-negative, sum to 1, and give training a share (e.g. 0.7/0.15/0.15).")

    def as_array(self) -> np.ndarray:
        return np.array([self.train, self.val, self.test], dtype=float)


def assign_splits(
    df: pd.DataFrame,
    fractions: SplitFractions = SplitFractions(),
    seed: int = 0,
    existing: pd.Series | None = None,
) -> tuple[pd.Series, list[str]]:
    """Return a split per row (index aligned with `df`) and notes about kept/moved assignments.

    `df` needs `uid`, `cluster_id`, `label`, `unlabeled`. `existing` maps uid -> split from an
    earlier manifest. Whole clusters go to one split; new clusters are placed greedily, largest first
    in seeded random order, into the split furthest below its target share of melanomas (for
    clusters holding one) or of all images.
    """
    notes: list[str] = []
    split = pd.Series(UNLABELED, index=df.index, dtype=object)
    labeled = ~df["unlabeled"].to_numpy(bool)
    work = df.loc[labeled, ["uid", "cluster_id", "label"]].copy()
    if existing is not None and len(existing):
        work["old"] = work["uid"].map(existing)
        work.loc[~work["old"].isin(SPLITS), "old"] = np.nan
    else:
        work["old"] = np.nan

    # Clusters with earlier assignments keep them; a cluster that now joins rows from two splits
    # (a new source linked them) goes to the split holding most of its rows, and we say so.
    cluster_split: dict[str, str] = {}
    for cid, old in work.dropna(subset=["old"]).groupby("cluster_id")["old"]:
        counts = old.value_counts()
        cluster_split[cid] = str(counts.index[0])
        if len(counts) > 1:
            notes.append(f"cluster {cid} now links rows previously in {', '.join(counts.index)}; "
                         f"all moved to {counts.index[0]} to prevent leakage")
    kept = int(work["old"].notna().sum())
    if kept:
        notes.append(f"kept the existing split of {kept} image(s)")

    stats = work.groupby("cluster_id")["label"].agg(["sum", "count"])
    target = fractions.as_array()
    pos_now = np.zeros(3)
    all_now = np.zeros(3)
    for cid, s in cluster_split.items():
        k = SPLITS.index(s)
        pos_now[k] += stats.at[cid, "sum"]
        all_now[k] += stats.at[cid, "count"]
    new = stats.drop(index=list(cluster_split), errors="ignore")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(new))
    new = new.iloc[order]
    # Largest (melanoma-rich, then big) clusters first: they are the hardest to place evenly.
    new = new.iloc[np.lexsort((-new["count"].to_numpy(), -new["sum"].to_numpy()))]
    total_pos = stats["sum"].sum()
    total_all = stats["count"].sum()
    allowed = target > 0
    for cid, (npos, nall) in zip(new.index, new[["sum", "count"]].to_numpy(), strict=True):
        if npos > 0 and total_pos > 0:
            deficit = target * total_pos - pos_now
            deficit_all = target * total_all - all_now
            score = deficit / max(total_pos, 1) + 1e-3 * deficit_all / max(total_all, 1)
        else:
            score = (target * (total_all - total_pos) - (all_now - pos_now)) / max(total_all, 1)
        score = np.where(allowed, score, -np.inf)
        k = int(np.argmax(score))
        cluster_split[cid] = SPLITS[k]
        pos_now[k] += npos
        all_now[k] += nall
    split.loc[labeled] = work["cluster_id"].map(cluster_split).to_numpy()
    return split, notes


def split_by_image(labels: pd.Series, fractions: SplitFractions = SplitFractions(), seed: int = 0) -> pd.Series:
    """The original study's split, reproduced to measure its leakage: each image on its own,
    stratified by label only, so images of one patient or lesion (and near-duplicates) can land in
    different splits. Never use it for a real estimate."""
    rng = np.random.default_rng(seed)
    split = pd.Series("train", index=labels.index, dtype=object)
    for _, members in labels.groupby(labels):
        order = rng.permutation(members.index.to_numpy())
        n_val = round(fractions.val * len(order))
        n_test = round(fractions.test * len(order))
        split.loc[order[:n_test]] = "test"
        split.loc[order[n_test:n_test + n_val]] = "val"
    return split
