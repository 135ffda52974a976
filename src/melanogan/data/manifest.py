"""Sources -> one manifest: decode once (cache), reject bad files, link duplicates, split, write.

`DATA_DIR/` after `prepare`:
- `manifest.parquet`    one row per usable image (schema in MANIFEST_COLUMNS + source metadata);
- `rejected.csv`        every row left out, with its reason;
- `near_duplicates.csv` pairs of rows that are the same photograph (perceptual hash or ISIC id);
- `prepare.json`        options, sources, counts and the default cache used by datasets;
- `cache/<name>/`       the decoded uint8 pixels (see `melanogan.data.cache`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from melanogan import __version__
from melanogan.data.cache import Cache, CacheOptions, build_cache, check_not_a_spawned_reimport, default_workers
from melanogan.data.dedup import DEFAULT_PHASH_DISTANCE, UnionFind, near_duplicate_pairs
from melanogan.data.skin import SKIN_TONE_VERSION, category_counts, ita_category
from melanogan.data.sources import DEFAULT_MELANOMA_FOLDERS, global_isic_id, read_source
from melanogan.data.splits import SplitFractions, assign_splits
from melanogan.errors import DataError
from melanogan.fileio import read_json, write_csv, write_json, write_parquet

MANIFEST = "manifest.parquet"
MANIFEST_COLUMNS = ["uid", "image_id", "path", "label", "diagnosis", "group_id", "cluster_id", "source",
                    "split", "width", "height", "content_hash", "phash", "patient_id", "lesion_id", "sex",
                    "age", "anatom_site", "origin", "ita", "ita_category", "ita_reason"]


@dataclass
class PrepareResult:
    data_dir: Path
    manifest: pd.DataFrame
    rejected: pd.DataFrame
    near_duplicates: pd.DataFrame
    cache: Cache
    notes: list[str] = field(default_factory=list)


def load_manifest(data_dir: Path) -> pd.DataFrame:
    """Read `DATA_DIR/manifest.parquet` with a clear error when it is not there."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: not found. Run `melanogan prepare --source KIND=PATH --out {data_dir}` first.")
    return pd.read_parquet(path)


def default_cache(data_dir: Path) -> Cache:
    """The cache written by the last `prepare` of DATA_DIR."""
    info_path = Path(data_dir) / "prepare.json"
    if not info_path.is_file():
        raise DataError(f"{info_path}: not found; {data_dir} was not made by `melanogan prepare`.")
    return Cache.open(Path(data_dir) / read_json(info_path)["cache"])


def cache_for(data_dir: Path, options: CacheOptions, log: Callable[[str], None] | None = None,
              on_progress: Callable[[int, int], None] | None = None, workers: int = 0) -> Cache:
    """DATA_DIR's images preprocessed with `options`: the default cache when its options are these,
    else `cache/<options.name>/`, built with prepare's machinery the first time (resumable, reused
    after). A model must see the preprocessing it was trained with, whatever DATA_DIR was prepared with."""
    data_dir = Path(data_dir)
    cache = default_cache(data_dir)
    if cache.options == options:
        return cache
    root = data_dir / "cache" / options.name
    rows = load_manifest(data_dir)
    rows = rows[rows["source"] != "synthetic"][["uid", "path"]]
    if (root / "meta.json").is_file():
        existing = Cache.open(root)
        if set(rows["uid"]) <= set(existing.index.loc[existing.index["slot"] >= 0, "uid"]):
            return existing
    if log:
        log(f"{data_dir} was prepared with other options ({cache.options.name}); caching its {len(rows)} images with "
            f"the model's preprocessing in {root} (once; reused next time)")
    built = build_cache(root, rows, options, workers=workers or default_workers(), on_progress=on_progress)
    bad = built.index[built.index["status"] != "ok"]
    if len(bad):
        raise DataError(f"{data_dir}: {len(bad)} image(s) could not be decoded again for {root} (e.g. "
                        f"{bad['path'].iat[0]}: {bad['status'].iat[0]} {bad['detail'].iat[0]}). Re-run `melanogan "
                        "prepare` for this DATA_DIR.")
    return built


def _name_sources(kinds: list[str]) -> list[str]:
    """`folder`, `folder#2`, ...: two sources of one kind stay distinguishable."""
    seen: dict[str, int] = {}
    names = []
    for kind in kinds:
        seen[kind] = seen.get(kind, 0) + 1
        names.append(kind if seen[kind] == 1 else f"{kind}#{seen[kind]}")
    return names


# The one size every photograph of a source kind is published at, where there is one (HAM10000: all
# 10,015 images are 600x450). A square file of such a source was squashed to a square by whoever
# resized it (a common Kaggle mirror); the cache takes a square file whole, so its lesions keep that
# squash, while a source whose files keep their aspect is centre-cropped and keeps its lesions' shape.
PUBLISHED_SIZE = {"ham10000": (600, 450)}


def squashed_copies_notes(manifest: pd.DataFrame, kinds: dict[str, str]) -> list[str]:
    """One note per source (`kinds`: source name -> kind) of a kind with a PUBLISHED_SIZE that is not
    square, whose kept images include square ones: how many, their commonest size, and by how much
    their lesions are squashed (published height / width). The pixels are left as they are: the note
    says what the geometry is, so that a model trained on squashed lesions is not mistaken for one
    trained on the published photographs."""
    notes = []
    for name, kind in kinds.items():
        width, height = PUBLISHED_SIZE.get(kind, (0, 0))
        if width == height or "width" not in manifest:  # no published size, or a square one
            continue
        rows = manifest[manifest["source"] == name]
        square = rows[(rows["width"] == rows["height"]) & (rows["width"] > 0)]
        if square.empty:
            continue
        w, h = square.groupby(["width", "height"]).size().idxmax()
        notes.append(f"{name}: {len(square):,} of {len(rows):,} images are square (most {w}x{h}), but {kind}'s "
                     f"photographs are published at {width}x{height}: these are copies squashed to a square, and "
                     f"are cached as they are, so their lesions are {height / width:.2f} as wide (for their height) "
                     f"as in the published photographs and in any source whose files keep their aspect. Prepare "
                     f"from the published files where you can; figures from these copies hold for squashed lesions.")
    return notes


def _resolve_exact_duplicates(ok: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Identical files: keep one row (labeled first); if their labels disagree, keep none."""
    ok = ok.sort_values(["unlabeled", "source_rank", "uid"], kind="stable")
    rejected = []
    keep = np.ones(len(ok), bool)
    dup_groups = ok[ok["content_hash"].duplicated(keep=False)].groupby("content_hash", sort=False)
    position = {uid: i for i, uid in enumerate(ok["uid"])}
    for _, grp in dup_groups:
        labels = set(grp.loc[~grp["unlabeled"], "label"])
        if len(labels) > 1:
            for uid in grp["uid"]:
                others = [o for o in grp["uid"] if o != uid]
                keep[position[uid]] = False
                rejected.append((uid, "label-conflict",
                                 f"identical file to {', '.join(others)} whose label differs; fix the labels"))
        else:
            first = grp["uid"].iloc[0]
            for uid in grp["uid"].iloc[1:]:
                keep[position[uid]] = False
                rejected.append((uid, "exact-duplicate", f"identical file to {first} (kept)"))
    rej = pd.DataFrame(rejected, columns=["uid", "reason", "detail"])
    return ok[keep], rej


def _clusters(ok: pd.DataFrame, all_rows: pd.DataFrame, pairs: pd.DataFrame) -> pd.Series:
    """Connected components of: same source group (patient/lesion), same ISIC id across sources
    (also through rows whose image is missing: their lesion ids still link), near-duplicate pairs."""
    uf = UnionFind()
    for uid in ok["uid"]:
        uf.find(uid)
    for src, gid, uid, iid in zip(all_rows["source"], all_rows["group_id"], all_rows["uid"], all_rows["image_id"],
                                  strict=True):
        group_node = f"group:{src}:{gid}"
        uf.union(uid, group_node)
        isic = global_isic_id(str(iid))
        if isic:
            uf.union(uid, f"isic:{isic}")
    for a, b in zip(pairs["uid_a"], pairs["uid_b"], strict=True):
        uf.union(a, b)
    return ok["uid"].map(lambda u: uf.find(u))


def prepare(
    sources: list[tuple[str, Path]],
    out: Path,
    options: CacheOptions = CacheOptions(),
    fractions: SplitFractions = SplitFractions(),
    seed: int = 0,
    workers: int = 0,
    melanoma_folders: tuple[str, ...] = DEFAULT_MELANOMA_FOLDERS,
    phash_distance: int = DEFAULT_PHASH_DISTANCE,
    on_progress: Callable[[int, int], None] | None = None,
) -> PrepareResult:
    """Read sources, decode every image once into the cache, and write the manifest and reports.
    `workers` 0: `default_workers()`."""
    if not sources:
        raise DataError("no --source given; pass at least one KIND=PATH (e.g. --source ham10000=/data/HAM10000).")
    check_not_a_spawned_reimport()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kinds = [k for k, _ in sources]
    names = _name_sources(kinds)
    frames = []
    for rank, ((kind, path), name) in enumerate(zip(sources, names, strict=True)):
        df = read_source(kind, path, melanoma_folders)
        df["source"] = name
        df["source_rank"] = rank
        frames.append(df)
    rows = pd.concat(frames, ignore_index=True)
    rows["uid"] = rows["source"] + ":" + rows["image_id"].astype(str)

    missing = rows["path"] == ""
    rejected = [pd.DataFrame({"uid": rows.loc[missing, "uid"], "reason": "missing-file",
                              "detail": "listed in the label file but no image file was found"})]
    candidates = rows.loc[~missing]
    cache_root = out / "cache" / options.name
    cache = build_cache(cache_root, candidates[["uid", "path"]], options, workers=workers or default_workers(),
                        on_progress=on_progress)
    facts = cache.index.drop(columns=["path", "slot", "signature"]).drop_duplicates("uid").set_index("uid")
    merged = candidates.join(facts, on="uid")
    merged["ita_category"] = merged["ita"].map(ita_category)
    bad = merged["status"] != "ok"
    rejected.append(merged.loc[bad, ["uid", "status", "detail"]].rename(columns={"status": "reason"}))
    ok, rej_dup = _resolve_exact_duplicates(merged.loc[~bad].copy())
    rejected.append(rej_dup)

    pairs = near_duplicate_pairs(ok, phash_distance)
    ok["cluster_id"] = _clusters(ok, rows, pairs).to_numpy()
    # ISIC-id links between kept rows are near-duplicates too, even when the hash missed them.
    isic = ok["image_id"].astype(str).map(global_isic_id)
    by_isic = ok.assign(isic=isic).dropna(subset=["isic"]).groupby("isic")["uid"].agg(list)
    id_pairs = [(g[0], other) for g in by_isic if len(g) > 1 for other in g[1:]]
    if id_pairs:
        id_df = pd.DataFrame(id_pairs, columns=["uid_a", "uid_b"]).assign(phash_distance=-1, evidence="isic-id")
        seen = set(zip(pairs["uid_a"], pairs["uid_b"], strict=True)) | set(zip(pairs["uid_b"], pairs["uid_a"],
                                                                                strict=True))
        id_df = id_df[[(a, b) not in seen for a, b in zip(id_df["uid_a"], id_df["uid_b"], strict=True)]]
        pairs = pd.concat([pairs, id_df], ignore_index=True)

    existing = None
    if (out / MANIFEST).is_file():
        old = pd.read_parquet(out / MANIFEST, columns=["uid", "split"])
        existing = old.set_index("uid")["split"]
    ok["split"], notes = assign_splits(ok, fractions, seed, existing)
    notes += squashed_copies_notes(ok, dict(zip(names, kinds, strict=True)))

    ok = ok.sort_values(["source_rank", "uid"], kind="stable")
    ok["label"] = ok["label"].astype(np.int8)
    ok.loc[ok["unlabeled"], "label"] = -1
    extra = sorted(c for c in ok.columns if c.startswith("meta_"))  # source-specific metadata (e.g. Derm7pt's)
    manifest = ok[MANIFEST_COLUMNS + extra].reset_index(drop=True)
    rejected_df = pd.concat([r for r in rejected if len(r)], ignore_index=True) if any(len(r) for r in rejected) \
        else pd.DataFrame(columns=["uid", "reason", "detail"])
    rejected_df = rejected_df.merge(rows[["uid", "source", "image_id", "path", "label"]], on="uid", how="left")
    rejected_df = rejected_df[["uid", "source", "image_id", "path", "label", "reason", "detail"]]

    write_parquet(out / MANIFEST, manifest)
    write_csv(out / "rejected.csv", rejected_df)
    write_csv(out / "near_duplicates.csv", pairs)
    write_json(out / "prepare.json", {
        "melanogan_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "sources": [{"kind": k, "path": str(Path(p).resolve()), "name": n}
                    for (k, p), n in zip(sources, names, strict=True)],
        "cache": str(cache_root.relative_to(out)),
        "cache_options": options.to_dict(),
        "split": {"train": fractions.train, "val": fractions.val, "test": fractions.test, "seed": seed},
        "phash_distance": phash_distance,
        "manifest_hash": manifest_hash(manifest),
        "counts": {"kept": len(manifest), "rejected": len(rejected_df)},
        # skin tone of the skin around each lesion (data/skin.py): images per ITA band, per source
        "skin_tone": {src: category_counts(g["ita_category"]) for src, g in manifest.groupby("source")},
        "skin_tone_version": SKIN_TONE_VERSION,
        "notes": notes,
    })
    return PrepareResult(out, manifest, rejected_df, pairs, cache, notes)


def manifest_hash(manifest: pd.DataFrame) -> str:
    """A short hash of what a study's results depend on: which images, their content, label and split."""
    cols = manifest[["uid", "content_hash", "label", "split"]].astype(str).agg("|".join, axis=1)
    return hashlib.sha256("\n".join(sorted(cols)).encode()).hexdigest()[:16]
