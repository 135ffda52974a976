"""How much of each source's photographs `prepare --hair-removal` inpaints, melanomas and the rest
apart: the share of each image's pixels that `hair_mask` flags, on the cached pixels the model sees
(default `prepare` options). Asks why hair removal helped only with Derm7pt held out (README, "Hair
removal under the protocol"); the answer was that the mask takes far more than hair.

    python studies/hair_by_source.py SHARED_DATA WORK [--json OUT]

WORK is a data folder: prepared there the first time (all three sources, a few minutes on 2 cores),
reused after.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from melanogan.bench.travel import SOURCES
from melanogan.data.images import hair_mask
from melanogan.data.manifest import default_cache, load_manifest, prepare

# The share of flagged pixels above which an image counts in the table's last column: a threshold
# for a count, not a measured hair level (the mask also takes pigment network, dots and borders).
HAIRY = 0.05


def hair_shares(data_dir: Path) -> pd.DataFrame:
    rows = load_manifest(data_dir)
    rows = rows[rows["source"] != "synthetic"].reset_index(drop=True)
    cache = default_cache(data_dir)
    pixels = cache.pixels
    slots = cache.slots_for(rows["uid"])
    share = np.array([(hair_mask(np.asarray(pixels[s])) > 0).mean() for s in slots])
    return rows.assign(hair_share=share)


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    kind = np.where(rows["label"] == 1, "melanoma", "other")
    return (rows.assign(kind=kind).groupby(["source", "kind"])["hair_share"]
            .agg(images="size", mean="mean", median="median", hairy=lambda s: float((s > HAIRY).mean()))
            .reset_index())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shared", type=Path, help="../shared/data")
    ap.add_argument("work", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not (args.work / "prepare.json").is_file():
        prepare([(kind, args.shared / folder) for kind, folder in SOURCES.values()], args.work)
    table = summary(hair_shares(args.work))
    print(f"| source | images | share of pixels flagged: mean | median | images over {HAIRY:.0%} |")
    print("| --- | --- | --- | --- | --- |")
    for r in table.itertuples():
        print(f"| {r.source} {r.kind} | {r.images:,} | {r.mean:.3f} | {r.median:.3f} | {r.hairy:.0%} |")
    if args.json:
        args.json.write_text(json.dumps(table.to_dict(orient="records"), indent=1))


if __name__ == "__main__":
    main()
