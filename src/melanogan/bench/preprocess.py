"""`melanogan bench preprocess`: our decode path against the naive one, on full-size JPEGs.

Naive = what the original study did on every pass: Keras `load_img(path, target_size=...)`, i.e. a
full-resolution Pillow decode then a (nearest-neighbour) resize, one image after another in one process.
The naive path is given its best case: Pillow keeps freed image blocks for reuse. Without that, each
24-megapixel decode page-faults fresh memory, and whether glibc happens to reuse it depends on what the
process did before: the same loop then ran at 6 or at 14 images/s from one run to the next, which would
inflate (or deflate) every ratio below by 2x.
Ours = the whole `prepare` decode stage: JPEG DCT-domain downscaling (Pillow `draft`), EXIF, crop and
resize, content and perceptual hashes, written to the cache, in `workers` processes.
Two ratios are reported: against the original single-process loop (what a user replaces), and
against the naive decode given the same worker processes (what the method alone buys).
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from melanogan.data.cache import Cache, CacheOptions, build_cache
from melanogan.data.dataset import CachedImageDataset
from melanogan.data.demo import render_phantom
from melanogan.data.transforms import eval_preset
from melanogan.fileio import write_json, write_parquet


def make_full_size_jpegs(folder: Path, n: int, width: int = 6000, height: int = 4000, seed: int = 0) -> list[str]:
    """n distinct 6000x4000 dermoscopy-like JPEGs (phantom upscaled + sensor noise), quality 92."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        small = render_phantom(rng, melanoma=bool(i % 2), width=600, height=400, hair=True)
        big = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        # Sensor-like noise, spatially correlated: files of ~2 MB, like ISIC's full-size JPEGs.
        noise = rng.normal(0, 1.5, (height // 2, width // 2, 3)).astype(np.float32)
        big = np.clip(big + cv2.resize(noise, (width, height)), 0, 255).astype(np.uint8)
        path = folder / f"full_{i:03d}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(big, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
        paths.append(str(path))
    return paths


def _reuse_image_memory() -> None:
    """Let Pillow keep up to 16 freed 16 MB blocks (a 6000x4000 RGB image takes 6): no page faults."""
    Image.core.set_blocks_max(16)


def _warm(_: int) -> None:
    import melanogan.data.cache  # noqa: F401  (import cost is start-up, not decoding)

    _reuse_image_memory()

    time.sleep(0.2)  # keep this worker busy so the other one gets a warm-up job too


def _naive_one(args: tuple[str, int]) -> int:
    path, size = args
    with Image.open(path) as img:
        if img.mode != "RGB":  # as load_img: an RGB JPEG is not copied
            img = img.convert("RGB")
        arr = np.asarray(img.resize((size, size), Image.Resampling.NEAREST))  # full decode, then nearest
    return int(arr[0, 0, 0])


def run(n_images: int = 64, size: int = 256, workers: int = 2, read_size: int = 224,
        read_images: int = 4000) -> dict:
    """Time both decode paths and cache reads; return the figures."""
    results: dict = {"n_images": n_images, "workers": workers, "cache_size": size, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="melanogan-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        paths = make_full_size_jpegs(tmp / "jpeg", n_images)
        results["generate_seconds"] = round(time.perf_counter() - t0, 1)
        results["mean_file_mb"] = round(sum(os.path.getsize(p) for p in paths) / len(paths) / 1e6, 2)

        _reuse_image_memory()
        _naive_one((paths[0], size))
        t0 = time.perf_counter()
        for p in paths:
            _naive_one((p, size))
        results["naive_1_process_images_per_s"] = round(n_images / (time.perf_counter() - t0), 2)

        # One warmed-up pool for both paths: process start-up (~1 s) is not what is being compared.
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            list(pool.map(_warm, range(workers)))
            list(pool.map(_naive_one, [(paths[0], size)] * workers * 2))
            t0 = time.perf_counter()
            list(pool.map(_naive_one, [(p, size) for p in paths]))
            naive = time.perf_counter() - t0
            results[f"naive_{workers}_processes_images_per_s"] = round(n_images / naive, 2)

            candidates = pd.DataFrame({"uid": [f"b:{i}" for i in range(n_images)], "path": paths})
            options = CacheOptions(size=size)
            t0 = time.perf_counter()
            cache = build_cache(tmp / "cache" / options.name, candidates, options, workers=workers,
                                executor=pool)
            ours = time.perf_counter() - t0
        assert (cache.index["status"] == "ok").all(), cache.index["detail"].tolist()
        results[f"ours_{workers}_processes_images_per_s"] = round(n_images / ours, 2)
        results["speedup_vs_original_loop"] = round(results[f"ours_{workers}_processes_images_per_s"]
                                                    / results["naive_1_process_images_per_s"], 2)
        results["speedup_same_processes"] = round(naive / ours, 2)

        # Cache reads: a dataset big enough to defeat nothing but the page cache, read in random order.
        reads = _cache_read_benchmark(tmp, size, read_size, read_images)
        results.update(reads)
    return results


def _cache_read_benchmark(tmp: Path, size: int, read_size: int, n: int) -> dict:
    root = tmp / "readcache"
    root.mkdir()
    pixels = np.lib.format.open_memmap(root / "pixels.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (64, size, size, 3), dtype=np.uint8)
    for i in range(0, n, 64):
        pixels[i:i + 64] = base[: min(64, n - i)]
    pixels.flush()
    del pixels
    options = CacheOptions(size=size)
    uids = [f"r:{i}" for i in range(n)]
    write_parquet(root / "index.parquet", pd.DataFrame({"uid": uids, "slot": np.arange(n), "status": "ok"}))
    write_json(root / "meta.json", {"options": options.to_dict()})
    manifest = pd.DataFrame({"uid": uids, "split": "train", "label": np.zeros(n, np.int8)})
    ds = CachedImageDataset(tmp, "train", transform=eval_preset(read_size), cache=Cache.open(root),
                            manifest=manifest)
    order = rng.permutation(n)
    for i in order[:64]:
        ds[int(i)]
    t0 = time.perf_counter()
    for i in order:
        ds[int(i)]
    dt = time.perf_counter() - t0
    return {"cache_read_images_per_s": round(n / dt, 1), "cache_read_size": read_size,
            "cache_read_note": "one process, random order, resize + float + normalise per image"}
