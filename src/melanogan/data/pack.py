"""A DATA_DIR shrunk for travel: its manifest and its cached pixels resized and JPEG-encoded.

Why: a GPU machine is often another machine (a rented box, a cluster node) reached through a
size-limited copy, and the prepared cache is large (8,106 images at 256 px are 1.6 GB). A GAN at
resolution R only ever sees the cache resized to R, so `pack` stores exactly that (the same
antialiased resize as the GAN's input preset) as JPEG: about 40 MB for those images at 128 px.
`unpack` turns a pack back into an ordinary DATA_DIR whose cache is at R.

What is kept honest:
- the manifest travels unchanged, so a GAN trained on the unpacked folder records the same
  manifest hash as the original DATA_DIR, and a study refuses it for any other data;
- the pixels are a lossy copy (JPEG at `quality`): the unpacked prepare.json and cache meta say
  so, and the GAN's run.json carries it;
- `source_cache_options` records the preprocessing the pixels came from, so images generated from
  a GAN trained on the unpacked folder are cached for the original data, not for the pack.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pandas as pd

from melanogan import __version__
from melanogan.data.cache import CACHE_FORMAT, INDEX_COLUMNS, CacheOptions
from melanogan.data.manifest import MANIFEST, default_cache, load_manifest, manifest_hash
from melanogan.data.skin import SKIN_TONE_VERSION
from melanogan.errors import DataError
from melanogan.fileio import atomic_path, read_json, write_json, write_parquet

PACK_FORMAT = 1
PACK_INFO = "pack.json"
PACK_IMAGES = "images.npz"


def resize_like_preset(pixels: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 with the resize stage of `eval_preset(size)` itself,
    so a GAN reading the packed pixels sees what it would have seen."""
    import torch

    from melanogan.data.transforms import eval_preset

    resize = eval_preset(size).transforms[0]
    tensor = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)  # copy: the cache memmap is read-only
    return resize(tensor).permute(1, 2, 0).contiguous().numpy()


def pack_data_dir(data_dir: Path, out: Path, size: int = 128, quality: int = 90,
                  log=None) -> dict:
    """Write OUT/{manifest.parquet, pack.json, images.npz}: every real manifest image of DATA_DIR's
    default cache, resized to `size` and JPEG-encoded (4:4:4, `quality`). Returns pack.json."""
    from PIL import Image

    data_dir, out = Path(data_dir), Path(out)
    if not 16 <= size <= 2048:
        raise DataError(f"pack size {size} is out of range; use 16..2048 (e.g. the GAN's resolution).")
    if not 50 <= quality <= 100:
        raise DataError(f"JPEG quality {quality} is out of range; use 50..100 (90: ~5 KB per 128 px image).")
    manifest = load_manifest(data_dir)
    cache = default_cache(data_dir)
    if size > cache.options.size:
        raise DataError(f"{data_dir}: its cache is {cache.options.size} px; a {size} px pack would only upsample it. "
                        f"Use --size {cache.options.size} or less, or prepare with a larger --size.")
    real = manifest[manifest["source"] != "synthetic"].reset_index(drop=True)
    slots = cache.slots_for(real["uid"])
    pixels = cache.pixels
    blobs, offsets = [], [0]
    for slot in slots:
        small = resize_like_preset(pixels[int(slot)], size)
        buf = io.BytesIO()
        Image.fromarray(small).save(buf, format="JPEG", quality=quality, subsampling=0)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
        offsets.append(offsets[-1] + len(blobs[-1]))
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / PACK_IMAGES, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, uids=real["uid"].to_numpy(dtype=str), offsets=np.asarray(offsets, np.int64),
                 data=np.concatenate(blobs) if blobs else np.zeros(0, np.uint8))
    write_parquet(out / MANIFEST, manifest)
    info = {"pack_format": PACK_FORMAT, "melanogan_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "from": str(data_dir.resolve()),
            "manifest_hash": manifest_hash(manifest), "size": size, "jpeg_quality": quality,
            "images": len(real), "bytes": int(offsets[-1]),
            "source_cache_options": cache.options.to_dict(),
            "prepare": read_json(data_dir / "prepare.json")}
    write_json(out / PACK_INFO, info)  # last: its presence marks the pack complete
    if log:
        log(f"packed {len(real)} images of {data_dir} at {size} px (JPEG {quality}) into {out}: "
            f"{offsets[-1] / 2**20:.1f} MiB")
    return info


def unpack_data_dir(pack: Path, out: Path, log=None) -> Path:
    """Turn a pack into a DATA_DIR (manifest, prepare.json, cache at the pack's size). Refuses a pack
    whose manifest does not match what was packed (a partial copy)."""
    from PIL import Image

    pack, out = Path(pack), Path(out)
    if not (pack / PACK_INFO).is_file():
        raise DataError(f"{pack}: not a complete melanogan pack ({PACK_INFO} missing); run `melanogan pack` again.")
    info = read_json(pack / PACK_INFO)
    if info.get("pack_format", 0) > PACK_FORMAT:
        raise DataError(f"{pack}: written by a newer melanogan (pack format {info['pack_format']}); upgrade melanogan.")
    manifest = load_manifest(pack)
    if manifest_hash(manifest) != info["manifest_hash"]:
        raise DataError(f"{pack / MANIFEST}: does not match {PACK_INFO} (hash {manifest_hash(manifest)} != "
                        f"{info['manifest_hash']}); the pack is incomplete or was edited. Pack it again.")
    with np.load(pack / PACK_IMAGES) as z:
        uids, offsets, data = z["uids"], z["offsets"], z["data"]
    source = CacheOptions.from_dict(info["source_cache_options"])
    options = CacheOptions.from_dict({**source.to_dict(), "size": int(info["size"])})
    size = options.size
    root = out / "cache" / options.name
    root.mkdir(parents=True, exist_ok=True)
    pixels = np.lib.format.open_memmap(root / ".pixels.tmp.npy", mode="w+", dtype=np.uint8,
                                       shape=(len(uids), size, size, 3))
    for i in range(len(uids)):
        try:
            image = Image.open(io.BytesIO(data[offsets[i]:offsets[i + 1]].tobytes()))
            pixels[i] = np.asarray(image.convert("RGB"))
        except Exception as exc:
            raise DataError(f"{pack / PACK_IMAGES}: image {i} ({uids[i]}) cannot be decoded ({exc}); "
                            "the pack is damaged. Pack it again.") from exc
    pixels.flush()
    del pixels
    (root / ".pixels.tmp.npy").replace(root / "pixels.npy")
    facts = manifest.set_index("uid")
    index = pd.DataFrame({"uid": uids, "path": [f"pack:{u}" for u in uids], "signature": "packed", "status": "ok",
                          "detail": "", "slot": np.arange(len(uids), dtype=np.int64)})
    for column in ("width", "height", "content_hash", "phash"):
        index[column] = facts[column].reindex(uids).to_numpy()
    index["ita"] = facts["ita"].reindex(uids).to_numpy() if "ita" in facts else np.nan
    index["ita_reason"] = facts["ita_reason"].reindex(uids).fillna("").to_numpy() if "ita_reason" in facts else ""
    index["ita_version"] = SKIN_TONE_VERSION
    index[["width", "height"]] = index[["width", "height"]].fillna(-1).astype(np.int64)
    write_parquet(root / "index.parquet", index[INDEX_COLUMNS])
    packed = {k: info[k] for k in ("from", "manifest_hash", "size", "jpeg_quality", "source_cache_options", "created")}
    write_json(root / "meta.json", {"format": CACHE_FORMAT, "options": options.to_dict(),
                                    "shape": [len(uids), size, size, 3], "dtype": "uint8",
                                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "packed": packed})
    write_parquet(out / MANIFEST, manifest)
    write_json(out / "prepare.json", {**info["prepare"], "cache": str(root.relative_to(out)),
                                      "cache_options": options.to_dict(), "packed": packed,
                                      "notes": [*info["prepare"].get("notes", []),
                                                f"unpacked from a {size} px JPEG-{info['jpeg_quality']} pack of "
                                                f"{info['from']}: the pixels are a lossy copy"]})
    if log:
        log(f"unpacked {len(uids)} images into {out} ({size} px cache)")
    return out


def data_space(data_dir: Path) -> CacheOptions | None:
    """The preprocessing DATA_DIR's pixels stand for: the packed-from cache for an unpacked pack,
    else the default cache's options (None when DATA_DIR has no prepare.json)."""
    path = Path(data_dir) / "prepare.json"
    if not path.is_file():
        return None
    info = read_json(path)
    if "packed" in info:
        return CacheOptions.from_dict(info["packed"]["source_cache_options"])
    return CacheOptions.from_dict(info["cache_options"])
