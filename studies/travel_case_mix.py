"""The per-diagnosis table and the case-mix AUC of `bench travel` (kept in its rows since they were
added), recomputed for a bench that ran before them, from what its temporary folder held: the report
evaluations' predictions.csv and metrics.json and the prepared folders' manifest.parquet, copied
(same relative paths) into KEEP before the bench removed them.

    python studies/travel_case_mix.py KEEP [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from melanogan.bench.travel import SOURCES, _mean_logits, case_mix, case_mix_lines, diagnosis_lines
from melanogan.classify.evaluate import diagnosis_table, json_safe
from melanogan.classify.metrics import roc_auc
from melanogan.data.manifest import load_manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("keep", type=Path)
    ap.add_argument("--json", type=Path)
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
        # run 0 is the defaults; the ones after it, as many as there are, one lever's members
        variants = [("defaults", [runs[0][1]])] + ([(f"members {len(runs) - 1}", [p for _, p in runs[1:]])]
                                                     if len(runs) > 1 else [])
        for name, frames in variants:
            scored = _mean_logits(frames).join(site_dx, on="uid")
            rows.append({"held_out": held, "variant": name,
                         "external_auc": roc_auc(scored["label"], scored["logit"]),
                         "report_by_diagnosis": json_safe(diagnosis_table(scored, None, bootstrap=300)),
                         "case_mix": json_safe(case_mix(scored, load_manifest(train)))})
    results = {"rows": rows}
    print(diagnosis_lines(results), "", case_mix_lines(results), sep="\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
