"""The results pages' summaries: pure functions of the stored answers (exact binomial CIs)."""

from __future__ import annotations

import math

from melanogan.serve.stats import accuracy


def turing_summary(rows) -> list[dict]:
    """Per reviewer: overall accuracy, on real and on synthetic images, and per class, with exact CIs."""
    out = []
    for reviewer in sorted({r["reviewer"] for r in rows}):
        mine = [r for r in rows if r["reviewer"] == reviewer]
        groups = [("all images", mine),
                  ("real images", [r for r in mine if r["truth"] == "real"]),
                  ("synthetic images", [r for r in mine if r["truth"] == "synthetic"]),
                  ("melanoma", [r for r in mine if r["label"] == 1]),
                  ("not melanoma", [r for r in mine if r["label"] == 0])]
        parts = []
        for name, group in groups:
            if not group and name != "all images":
                continue
            acc = accuracy(sum(int(r["correct"]) for r in group), len(group))
            conf = sum(r["confidence"] for r in group) / len(group) if group else math.nan
            parts.append({"group": name, "acc": acc, "mean_confidence": conf})
        out.append({"reviewer": reviewer, "groups": parts})
    return out


def review_summary(rows) -> list[dict]:
    out = []
    for reviewer in sorted({r["reviewer"] for r in rows}):
        mine = [r for r in rows if r["reviewer"] == reviewer]
        decided = [r for r in mine if r["reviewer_diagnosis"] != "unsure"]
        reviewer_right = sum((r["reviewer_diagnosis"] == "melanoma") == (r["true_label"] == 1) for r in decided)
        model_right = sum((r["model_decision"] == "melanoma") == (r["true_label"] == 1) for r in mine)
        out.append({"reviewer": reviewer, "n": len(mine), "agree": accuracy(sum(r["agree"] for r in mine), len(mine)),
                    "reviewer_correct": accuracy(reviewer_right, len(decided)),
                    "model_correct": accuracy(model_right, len(mine))})
    return out
