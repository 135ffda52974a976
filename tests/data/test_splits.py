"""Split invariants, including property tests over random cluster structures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from melanogan.data.splits import SplitFractions, assign_splits
from melanogan.errors import DataError


def _frame(cluster_sizes: list[int], positives: list[bool]) -> pd.DataFrame:
    rows = []
    for c, (size, pos) in enumerate(zip(cluster_sizes, positives, strict=True)):
        for k in range(size):
            rows.append({"uid": f"u{c}_{k}", "cluster_id": f"c{c}", "label": int(pos and k == 0), "unlabeled": False})
    return pd.DataFrame(rows)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.booleans()), min_size=3, max_size=120), st.integers(0, 10_000))
def test_clusters_never_straddle_and_assignment_is_deterministic(clusters, seed):
    df = _frame([c[0] for c in clusters], [c[1] for c in clusters])
    a, _ = assign_splits(df, SplitFractions(), seed)
    b, _ = assign_splits(df, SplitFractions(), seed)
    assert (a == b).all()
    assert set(a) <= {"train", "val", "test"}
    assert df.assign(split=a).groupby("cluster_id")["split"].nunique().max() == 1


def test_stratified_proportions_on_a_realistic_population():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 8, 800).tolist()
    pos = (rng.uniform(size=800) < 0.1).tolist()
    df = _frame(sizes, pos)
    split, _ = assign_splits(df, SplitFractions(0.7, 0.15, 0.15), seed=3)
    counts = df.assign(split=split).groupby("split")["label"].agg(["size", "sum"])
    total, total_pos = len(df), df["label"].sum()
    for name, frac in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        assert abs(counts.at[name, "size"] / total - frac) < 0.02
        assert abs(counts.at[name, "sum"] / total_pos - frac) < 0.02


def test_existing_assignments_are_kept_and_new_rows_follow_their_cluster():
    df = _frame([2, 1, 1, 1, 1, 1, 1, 1, 1, 1], [True] + [False] * 9)
    first, _ = assign_splits(df, seed=0)
    grown = pd.concat([df, pd.DataFrame([{"uid": "new", "cluster_id": "c0", "label": 0, "unlabeled": False}])],
                      ignore_index=True)
    existing = pd.Series(first.to_numpy(), index=df["uid"])
    second, notes = assign_splits(grown, seed=123, existing=existing)  # another seed: must not matter
    assert (second.iloc[: len(df)].to_numpy() == first.to_numpy()).all()
    assert second.iloc[-1] == first.iloc[0]
    assert any("kept" in n for n in notes)


def test_merged_cluster_moves_to_majority_split_and_says_so():
    df = pd.DataFrame({"uid": ["a", "b", "c"], "cluster_id": ["k", "k", "k"], "label": [0, 0, 1],
                       "unlabeled": False})
    existing = pd.Series({"a": "train", "b": "train", "c": "test"})
    split, notes = assign_splits(df, existing=existing)
    assert set(split) == {"train"}
    assert any("moved to train" in n for n in notes)


def test_unlabeled_rows_stay_out_and_zero_fraction_split_stays_empty():
    df = _frame([1] * 50, [i % 5 == 0 for i in range(50)])
    df.loc[:4, "unlabeled"] = True
    split, _ = assign_splits(df, SplitFractions(0.8, 0.2, 0.0), seed=1)
    assert (split[:5] == "unlabeled").all()
    assert "test" not in set(split[5:])


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.5), (0.0, 0.5, 0.5), (1.2, -0.1, -0.1)])
def test_bad_fractions(fractions):
    with pytest.raises(DataError, match="sum to 1"):
        SplitFractions(*fractions)


def test_split_by_image_ignores_groups_and_keeps_the_label_shares():
    from melanogan.data.splits import split_by_image

    labels = pd.Series([1] * 20 + [0] * 80)
    split = split_by_image(labels, seed=0)
    counts = pd.crosstab(split, labels)
    assert counts.loc["test", 1] == counts.loc["val", 1] == 3 and counts.loc["train", 1] == 14
    assert counts.loc["test", 0] == counts.loc["val", 0] == 12 and counts.loc["train", 0] == 56
    assert split.tolist() == split_by_image(labels, seed=0).tolist() != split_by_image(labels, seed=1).tolist()
