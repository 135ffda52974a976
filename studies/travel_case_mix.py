"""The per-diagnosis table and the case-mix AUC of `bench travel` (kept in its rows since they were
added) for the defaults' model of a bench that ran before them, from what its temporary folder held:
the report evaluations' predictions.csv and metrics.json and the prepared folders' manifest.parquet,
copied (same relative paths) into KEEP before the bench removed them.

    python studies/travel_case_mix.py KEEP [--json OUT] [--ham-metadata HAM10000_metadata.csv]

With `--ham-metadata`, HAM10000's report part (if held out) also splits its naevi by how the
diagnosis was confirmed (`dx_type`: follow-up, histopathology, consensus): the melanomas against each.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from melanogan.bench.travel import SOURCES, case_mix, case_mix_lines, diagnosis_lines
from melanogan.classify.evaluate import diagnosis_table, json_safe
from melanogan.classify.metrics import roc_auc
from melanogan.data.manifest import load_manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("keep", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--ham-metadata", type=Path)
    args = ap.parse_args()
    reports: dict[str, list[tuple[str, pd.DataFrame]]] = {}
    for metrics_file in sorted(args.keep.glob("eval-*/metrics.json")):
        m = json.loads(metrics_file.read_text())
        data = Path(m["data_dir"]).name
        if not data.startswith("site-"):  # an internal evaluation
            continue
        held = data.split("-")[1]
        preds = pd.read_csv(metrics_file.with_name("predictions.csv"))
        reports.setdefault(held, []).append((Path(m["run_dir"]).name, preds))
    rows = []
    for held in [h for h in SOURCES if h in reports]:
        runs = sorted(reports[held], key=lambda r: int(r[0].rsplit("-", 1)[1]))
        site = next(args.keep.glob(f"site-{held}-*/manifest.parquet")).parent
        train = next(args.keep.glob(f"train-{held}-*/manifest.parquet")).parent
        site_dx = load_manifest(site).set_index("uid")["diagnosis"]
        # run 0 is the defaults' model (the runs after it are the levers', whose reports a copy taken
        # every 30 s may have missed at the end)
        run, preds = runs[0]
        assert run == f"run-{held}-0", run
        scored = preds.join(site_dx, on="uid")
        row = {"held_out": held, "variant": "defaults", "external_auc": roc_auc(scored["label"], scored["logit"]),
               "report_by_diagnosis": json_safe(diagnosis_table(scored, None, bootstrap=300)),
               "case_mix": json_safe(case_mix(scored, load_manifest(train)))}
        if held == "ham10000" and args.ham_metadata:
            row["naevi_by_confirmation"] = _naevi_by_confirmation(scored, load_manifest(site), args.ham_metadata)
        rows.append(row)
    results = {"rows": rows}
    print(diagnosis_lines(results), "", case_mix_lines(results), sep="\n")
    for row in rows:
        for kind, d in row.get("naevi_by_confirmation", {}).items():
            print(f"{row['held_out']}: melanomas against naevi confirmed by {kind} ({d['n_images']}): ROC-AUC "
                  f"{d['roc_auc']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def _naevi_by_confirmation(scored: pd.DataFrame, manifest: pd.DataFrame, metadata: Path) -> dict:
    """The melanomas against HAM10000's naevi of one `dx_type` at a time, with grouped-bootstrap CIs."""
    from melanogan.classify.metrics import bootstrap_ci

    how = pd.read_csv(metadata, usecols=["image_id", "dx_type"]).set_index("image_id")["dx_type"]
    scored = scored.join(manifest.set_index("uid")["image_id"].astype(str), on="uid").join(how, on="image_id")
    melanomas = scored[scored["label"] == 1]
    out = {}
    for kind, naevi in scored[(scored["label"] == 0) & (scored["diagnosis"] == "nv")].groupby("dx_type"):
        pair = pd.concat([melanomas, naevi])
        ci = bootstrap_ci(pair["label"].to_numpy(), pair["logit"].to_numpy(), pair["group"].to_numpy(), n=300)
        out[str(kind)] = {"n_images": len(naevi), "roc_auc": roc_auc(pair["label"], pair["logit"]), "ci95": list(ci)}
    return out


if __name__ == "__main__":
    main()
