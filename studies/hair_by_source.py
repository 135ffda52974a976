"""How much of each source's photographs `prepare --hair-removal` inpaints, melanomas and the rest
apart: the share of each image's pixels that `hair_mask` flags, with each `--hair-method`, on the
cached pixels the model sees (default `prepare` options). Asked why hair removal helped only with
Derm7pt held out (README, "Hair removal under the protocol"): the `blackhat` mask took far more than
hair; `lines` is the mask made to take hair only.

    python studies/hair_by_source.py SHARED_DATA WORK [--json OUT] [--examples OUT.jpg]

--examples: for each source, the images whose `lines` mask flags the most (the hairiest) and two at
random: image | blackhat mask | lines mask | after removal with lines.

WORK is a data folder: prepared there the first time (all three sources, a few minutes on 2 cores),
reused after.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from melanogan.bench.travel import SOURCES
from melanogan.data.images import HairMethod, hair_mask
from melanogan.data.manifest import default_cache, load_manifest, prepare

# The share of flagged pixels above which an image counts in the table's last column: a threshold
# for a count, not a measured hair level (the blackhat mask also takes pigment network, dots and borders).
HAIRY = 0.05


def hair_shares(data_dir: Path) -> pd.DataFrame:
    """One row per image and method: the share of its pixels the method's mask flags."""
    rows = load_manifest(data_dir)
    rows = rows[rows["source"] != "synthetic"].reset_index(drop=True)
    cache = default_cache(data_dir)
    pixels = cache.pixels
    slots = cache.slots_for(rows["uid"])
    out = []
    for method in HairMethod:
        t0 = time.perf_counter()
        share = np.array([(hair_mask(np.asarray(pixels[s]), method) > 0).mean() for s in slots])
        # the mask's cost at the cache size, one process (prepare pays it once per image and worker)
        print(f"{method}: {(time.perf_counter() - t0) / len(slots) * 1000:.1f} ms per image "
              f"({len(slots):,} images, reading the cache included)")
        out.append(rows.assign(method=str(method), hair_share=share))
    return pd.concat(out, ignore_index=True)


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    kind = np.where(rows["label"] == 1, "melanoma", "other")
    return (rows.assign(kind=kind).groupby(["method", "source", "kind"])["hair_share"]
            .agg(images="size", mean="mean", median="median", hairy=lambda s: float((s > HAIRY).mean()))
            .reset_index())


def examples(data_dir: Path, shares: pd.DataFrame, out: Path, seed: int = 0) -> None:
    import cv2

    from melanogan.data.images import remove_hair

    cache = default_cache(data_dir)
    pixels = cache.pixels
    lines = shares[shares["method"] == "lines"].reset_index(drop=True)
    rng = np.random.default_rng(seed)
    tiles = []
    for source in sorted(lines["source"].unique()):
        rows = lines[lines["source"] == source]
        picks = list(rows.nlargest(2, "hair_share").index) + list(rng.choice(rows.index, 2, replace=False))
        for i in picks:
            img = np.asarray(pixels[cache.slots_for(lines.loc[[i], "uid"])[0]])
            old, new = (np.repeat(hair_mask(img, m)[..., None], 3, axis=2) for m in ("blackhat", "lines"))
            tiles.append(np.hstack([img, old, new, remove_hair(img, HairMethod.lines)]))
    grid = np.vstack(tiles)
    grid = cv2.resize(grid, (grid.shape[1] // 2, grid.shape[0] // 2), interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise SystemExit(f"{out}: OpenCV could not encode the examples as JPEG")
    out.write_bytes(encoded.tobytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shared", type=Path, help="../shared/data")
    ap.add_argument("work", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--examples", type=Path)
    args = ap.parse_args()
    if not (args.work / "prepare.json").is_file():
        prepare([(kind, args.shared / folder) for kind, folder in SOURCES.values()], args.work)
    shares = hair_shares(args.work)
    table = summary(shares)
    print(f"| mask | source | images | share of pixels flagged: mean | median | images over {HAIRY:.0%} |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in table.itertuples():
        print(f"| {r.method} | {r.source} {r.kind} | {r.images:,} | {r.mean:.3f} | {r.median:.3f} | {r.hairy:.0%} |")
    if args.json:
        args.json.write_text(json.dumps(table.to_dict(orient="records"), indent=1))
    if args.examples:
        examples(args.work, shares, args.examples)


if __name__ == "__main__":
    main()
