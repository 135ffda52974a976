"""Leakage and balance checks over a prepared dataset (`melanogan audit DATA_DIR`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from melanogan.data.manifest import load_manifest
from melanogan.data.splits import SPLITS


@dataclass
class AuditReport:
    checks: list[tuple[str, bool, str]] = field(default_factory=list)  # (name, passed, detail)
    per_split: pd.DataFrame | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def to_dict(self) -> dict:
        return {"passed": self.passed,
                "checks": [{"name": n, "passed": ok, "detail": d} for n, ok, d in self.checks],
                "per_split": [] if self.per_split is None else self.per_split.reset_index().to_dict("records"),
                "warnings": self.warnings}


def _spanning(df: pd.DataFrame, key: str) -> pd.Series:
    n = df.groupby(key)["split"].nunique()
    return n[n > 1]


def audit_manifest(manifest: pd.DataFrame, near_duplicates: pd.DataFrame | None = None) -> AuditReport:
    """Check that no patient/lesion group, duplicate cluster or identical file spans two splits,
    that synthetic rows are only in train, and report the melanoma rate per split."""
    report = AuditReport()
    labeled = manifest[manifest["split"].isin(SPLITS)]
    for key, what in (("cluster_id", "linked cluster (patient, lesion or near-duplicate)"),
                      ("content_hash", "identical file")):
        spanning = _spanning(labeled, key)
        report.checks.append((f"no {what} in two splits", len(spanning) == 0,
                              f"{len(spanning)} span several splits, e.g. {', '.join(map(str, spanning.index[:3]))}"
                              if len(spanning) else f"{labeled[key].nunique()} checked"))
    grouped = labeled.assign(group=labeled["source"] + ":" + labeled["group_id"].astype(str))
    spanning = _spanning(grouped, "group")
    report.checks.append(("no patient/lesion group in two splits", len(spanning) == 0,
                          f"{len(spanning)} groups span splits, e.g. {', '.join(spanning.index[:3])}"
                          if len(spanning) else f"{grouped['group'].nunique()} groups checked"))
    synthetic = manifest[manifest["source"].astype(str).str.startswith("synthetic")]
    bad_syn = synthetic[synthetic["split"] != "train"]
    report.checks.append(("synthetic images only in train", len(bad_syn) == 0,
                          f"{len(bad_syn)} synthetic rows outside train" if len(bad_syn)
                          else f"{len(synthetic)} synthetic rows"))
    if near_duplicates is not None and len(near_duplicates):
        split_of = manifest.set_index("uid")["split"]
        a = near_duplicates["uid_a"].map(split_of)
        b = near_duplicates["uid_b"].map(split_of)
        cross = near_duplicates[a.notna() & b.notna() & (a != b)
                                & a.isin(SPLITS) & b.isin(SPLITS)]
        report.checks.append(("no near-duplicate pair across splits", len(cross) == 0,
                              f"{len(cross)} pairs cross splits" if len(cross)
                              else f"{len(near_duplicates)} near-duplicate pairs, all within one split"))
        clusters = manifest.set_index("uid")["label"]
        la, lb = near_duplicates["uid_a"].map(clusters), near_duplicates["uid_b"].map(clusters)
        conflicts = int(((la != lb) & la.ge(0) & lb.ge(0)).sum())
        if conflicts:
            report.warnings.append(f"{conflicts} near-duplicate pair(s) carry different labels: "
                                   "check near_duplicates.csv")
    per_split = labeled.groupby("split").agg(images=("uid", "size"), melanoma=("label", "sum"),
                                             groups=("cluster_id", "nunique"))
    per_split["melanoma_rate"] = per_split["melanoma"] / per_split["images"]
    report.per_split = per_split.reindex([s for s in SPLITS if s in per_split.index])
    for split, row in report.per_split.iterrows():
        if row["melanoma"] == 0:
            report.warnings.append(f"split {split} has no melanoma: AUC cannot be computed on it")
    return report


def audit(data_dir: Path) -> AuditReport:
    manifest = load_manifest(data_dir)
    nd_path = Path(data_dir) / "near_duplicates.csv"
    near = pd.read_csv(nd_path) if nd_path.is_file() else None
    return audit_manifest(manifest, near)
