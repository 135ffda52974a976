"""The SYN_DIR contract between the GAN (which writes synthetic sets) and the classifier (which
reads them): in which preprocessing the generated images live, and how they are cached."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from melanogan.data.cache import CacheOptions
from melanogan.data.images import HairMethod
from melanogan.errors import MelanoganError
from melanogan.fileio import read_json

# 2: images cached without a second colour constancy / hair removal; `cache_options` is the real
# data's preprocessing (the space the images live in), `decode_options` what was applied to them.
SYNTHETIC_FORMAT = 2


def synthetic_decode_options(space: CacheOptions) -> CacheOptions:
    """How generated images are cached for real data preprocessed with `space`: same size, nothing
    applied a second time."""
    return replace(space, hair_removal=False, hair_method=HairMethod.lines, color_constancy=False, white_level=0,
                   clahe=0.0)


def check_synthetic_space(syn_dir: Path, data_options: CacheOptions) -> None:
    """Refuse a SYN_DIR whose images were generated in another preprocessing than `data_options` (the
    classifier's real data): mixing them would teach the classifier that a colour cast or a size
    means melanoma."""
    info_path = Path(syn_dir) / "prepare.json"
    info = read_json(info_path) if info_path.is_file() else {}
    if info.get("kind") != "synthetic":
        raise MelanoganError(f"{syn_dir}: not a synthetic set from `melanogan generate` (no synthetic prepare.json).")
    space = CacheOptions.from_dict(info["cache_options"])
    if info.get("synthetic_format", 1) < SYNTHETIC_FORMAT and (space.color_constancy or space.hair_removal):
        raise MelanoganError(f"{syn_dir}: made by an older melanogan that applied colour constancy/hair removal to "
                             "the generated images a second time. Regenerate it with `melanogan generate`.")
    if space != data_options:
        raise MelanoganError(f"{syn_dir}: generated for data preprocessed as {space.name} (from "
                             f"{info.get('real_data_dir')}), but the classifier's data is preprocessed as "
                             f"{data_options.name}. Train the GAN on this DATA_DIR (or prepare the data with the "
                             "same options) and generate again.")


def check_same_decoding(out: Path, decode: CacheOptions) -> None:
    """One SYN_DIR, one way of caching its images: `generate` (nothing applied again) and
    `import-synthetic` (the real preprocessing) cannot add to each other's folder."""
    info = Path(out) / "prepare.json"
    if info.is_file():
        previous = read_json(info).get("decode_options")
        if previous is not None and CacheOptions.from_dict(previous) != decode:
            raise MelanoganError(f"{out}: holds synthetic images cached another way ({previous}); "
                                 "use a new --out for these.")


SYNTHETIC_SOURCE = "synthetic"
PROVENANCE_COLUMNS = ["checkpoint_hash", "checkpoint_step", "seed", "noise_index", "generator"]
LABELS = {"melanoma": 1, "mel": 1, "1": 1, "other": 0, "benign": 0, "0": 0}


def parse_label(label: str) -> int:
    key = str(label).strip().lower()
    if key not in LABELS:
        raise MelanoganError(f"--label {label!r} is unknown; use melanoma or other.")
    return LABELS[key]


def synthetic_rows(table: pd.DataFrame, label: int, origin: str, **provenance) -> pd.DataFrame:
    """Manifest rows in the real schema for cached synthetic images (`table`: image_id, uid, path and
    the cache's width, height, content_hash, phash): split train, one group per image, no patient
    metadata, and the provenance columns."""
    from melanogan.data.manifest import MANIFEST_COLUMNS

    rows = table.assign(label=np.int8(label), diagnosis="synthetic-melanoma" if label else "synthetic-other",
                        group_id=table["image_id"], cluster_id=table["image_id"], source=SYNTHETIC_SOURCE,
                        split="train", patient_id=pd.NA, lesion_id=pd.NA, sex=pd.NA, age=np.nan, anatom_site=pd.NA,
                        origin=origin, ita=np.nan, ita_category="unknown",
                        ita_reason="synthetic: `evaluate-gan` compares its skin tone with the real images'",
                        **provenance)
    for col in ("patient_id", "lesion_id", "sex", "anatom_site", "origin"):
        rows[col] = rows[col].astype("string")
    return rows[[*MANIFEST_COLUMNS, *PROVENANCE_COLUMNS]]


def import_synthetic(folder: Path, label: str, out: Path, real_dir: Path, workers: int = 0) -> pd.DataFrame:
    """A folder of images from any generator (StyleGAN2-ADA, a diffusion model, ...) as a SYN_DIR that
    `evaluate-gan`, `train --synthetic` and the study read like `generate`'s output: manifest with
    provenance (source folder, file), split train, and a cache with the real data's preprocessing
    (such generators learn raw images, so colour constancy etc. are applied as to real ones). Files
    that fail decoding are listed in OUT/rejected.csv, as `prepare` does; the rest are imported."""
    from melanogan.data.cache import build_cache, default_workers
    from melanogan.data.manifest import MANIFEST, default_cache, load_manifest
    from melanogan.data.sources import IMAGE_EXTENSIONS
    from melanogan.fileio import write_csv, write_json, write_parquet

    y = parse_label(label)
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise MelanoganError(f"{folder}: not a folder of images.")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise MelanoganError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found.")
    load_manifest(real_dir)  # a clear error if REAL is not a prepared DATA_DIR
    options = default_cache(real_dir).options
    check_same_decoding(out, options)
    tag = folder.resolve().name
    rows = pd.DataFrame({"image_id": [f"imported-{tag}-{p.relative_to(folder).with_suffix('').as_posix()}"
                                      for p in files], "path": [str(p.resolve()) for p in files]})
    rows["uid"] = SYNTHETIC_SOURCE + ":" + rows["image_id"]
    cache_root = out / "cache" / options.name
    existing = load_manifest(out) if (out / MANIFEST).is_file() else None
    candidates = rows if existing is None else pd.concat(
        [existing[~existing["uid"].isin(rows["uid"])][["uid", "path"]], rows[["uid", "path"]]], ignore_index=True)
    cache = build_cache(cache_root, candidates[["uid", "path"]], options, workers=workers or default_workers())
    facts = cache.index.set_index("uid")
    rows = rows.join(facts[["status", "detail", "width", "height", "content_hash", "phash"]], on="uid")
    bad = rows[rows["status"] != "ok"]
    ok = rows[rows["status"] == "ok"].copy()
    if ok.empty:
        raise MelanoganError(f"{folder}: none of the {len(rows)} image(s) could be decoded (e.g. {bad['path'].iat[0]}: "
                             f"{bad['status'].iat[0]} {bad['detail'].iat[0]}).")
    manifest = synthetic_rows(ok, y, str(folder.resolve()), checkpoint_hash="", checkpoint_step=-1, seed=-1,
                              noise_index=-1, generator=f"imported:{tag}")
    if existing is not None:  # several imports (e.g. per class) accumulate in one SYN_DIR
        manifest = pd.concat([existing[~existing["uid"].isin(manifest["uid"])], manifest], ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "rejected.csv", bad.rename(columns={"status": "reason"})[["uid", "path", "reason", "detail"]])
    write_parquet(out / MANIFEST, manifest)
    write_json(out / "prepare.json", {
        "kind": "synthetic", "synthetic_format": SYNTHETIC_FORMAT, "cache": str(cache_root.relative_to(out)),
        "cache_options": options.to_dict(), "decode_options": options.to_dict(),
        "imported_from": str(folder.resolve()), "real_data_dir": str(Path(real_dir).resolve()),
        "trained_on_split": "unknown (imported)", "rejected": len(bad),
        "counts": {int(k): int(v) for k, v in manifest["label"].value_counts().items()}})
    manifest.attrs["rejected"] = len(bad)  # files of this call that failed decoding (rejected.csv)
    return manifest
