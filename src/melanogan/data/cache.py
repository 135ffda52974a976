"""The preprocessing cache: every image decoded once into a uint8, memory-mapped (N, S, S, 3) array.

Layout of `DATA_DIR/cache/<name>/` (name = size, mode, options and a hash of all options):
- `meta.json`     the options and array shape; a different option makes a different folder, so a
                  cache is never silently stale;
- `pixels.npy`    uint8 (N, S, S, 3), opened with mmap so memory does not grow with the dataset;
- `index.parquet` one row per file seen: uid, file signature (size + mtime), status/reason, slot in
                  `pixels.npy` (-1 when rejected), original width/height, content and perceptual hash.

Building works in chunks written atomically to `work/`: an interrupted build resumes from the
chunks already written; entries whose file signature is unchanged are reused on later runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

from melanogan.data.images import DEFAULT_MAX_PIXELS, HairMethod, ImageRejected, ResizeMode, decode_file
from melanogan.data.skin import SKIN_TONE_VERSION
from melanogan.errors import DataError
from melanogan.fileio import atomic_path, read_json, write_json, write_parquet

CACHE_FORMAT = 1  # bump when the decoding code changes what pixels it produces
CHUNK_SIZE = 32  # at most; smaller when needed to give every worker several chunks
INDEX_COLUMNS = ["uid", "path", "signature", "status", "detail", "slot", "width", "height", "content_hash", "phash",
                 "ita", "ita_reason", "ita_version"]


@dataclass(frozen=True)
class CacheOptions:
    """Everything that changes the cached pixels. Two caches with equal options are interchangeable."""

    size: int = 256
    resize_mode: ResizeMode = ResizeMode.crop
    hair_removal: bool = False
    # On by default: Shades of Gray was the largest measured factor in external AUC, in both
    # directions between HAM10000 and the ISIC archive, and under leave-one-source-out turning it off
    # lost 0.145, 0.139 and 0.226 (split 39000) while the internal test AUC rose with every source
    # (README, "Models that travel").
    color_constancy: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Which pixels hair removal inpaints (only read when hair_removal is on). `lines` keeps long thin
    # lines only; `blackhat`, the one mask before it, also erased pigment network (README, "Hair removal").
    hair_method: HairMethod = HairMethod.lines
    # Exposure normalisation after colour constancy (images.normalise_exposure): every image scaled so
    # that its illuminant's grey level is this value; 0 keeps the exposure as captured. Off by default:
    # level 180 passed the leave-one-source-out rule on split 40000 and was the default, then did not
    # replicate: turned off on split 41000 it lost with two sources of three, on split 43000 it gained
    # with HAM10000 (+0.037) and the ISIC set (+0.019), which by the criterion committed before that run
    # sends the default back to 0 (README, "Models that travel").
    white_level: int = 0
    # Local contrast equalisation, last (images.equalise_local_contrast): CLAHE on the lightness with
    # this clip limit; 0 keeps the contrast as captured. Off by default: under leave-one-source-out
    # (clip 2, at equal steps) it gained with no held-out source significantly on split 42000 and lost
    # with the ISIC set on both split 42000 and split 44000, significantly on 44000 (README, "Models
    # that travel").
    clahe: float = 0.0

    def __post_init__(self) -> None:
        if not 16 <= self.size <= 2048:
            raise DataError(f"cache size {self.size} is out of range; use 16..2048 (default 256).")
        if isinstance(self.white_level, bool) or not isinstance(self.white_level, int) \
                or not (self.white_level == 0 or 16 <= self.white_level <= 255):
            raise DataError(f"white level {self.white_level!r} is out of range; use a grey level 16..255 (180 "
                            "was measured), or 0 to keep the exposure as captured (the default).")
        if isinstance(self.clahe, bool) or not isinstance(self.clahe, (int, float)) \
                or not (self.clahe == 0 or 1.0 <= self.clahe <= 40.0):
            raise DataError(f"CLAHE clip limit {self.clahe!r} is out of range; use 1..40 (2 is the usual choice in "
                            "dermoscopy), or 0 to keep the contrast as captured (the default).")
        object.__setattr__(self, "clahe", float(self.clahe))  # 2 and 2.0 are one cache
        try:
            object.__setattr__(self, "resize_mode", ResizeMode(self.resize_mode))
        except ValueError:
            raise DataError(f"resize mode {self.resize_mode!r} is unknown; use one of "
                            f"{', '.join(m.value for m in ResizeMode)}.") from None
        try:
            object.__setattr__(self, "hair_method", HairMethod(self.hair_method))
        except ValueError:
            raise DataError(f"hair method {self.hair_method!r} is unknown; use one of "
                            f"{', '.join(m.value for m in HairMethod)}.") from None
        if not self.hair_removal and self.hair_method != HairMethod.lines:
            # No pixel would depend on it: asking for another mask without hair removal is a mistake
            # (and one value keeps equal caches equal: cache_for reuses the default cache on equal options).
            raise DataError(f"hair method {self.hair_method} has no effect without hair removal: add "
                            "--hair-removal (hair_removal=True), or leave the method at its default.")

    @classmethod
    def from_dict(cls, d: dict) -> CacheOptions:
        """Options as a cache, run or pack recorded them. Records from before `hair_method` existed
        were made with the one mask there was, `blackhat`: reading them with today's default would
        score an old run on pixels preprocessed differently from its training data."""
        legacy = {"hair_method": HairMethod.blackhat} if d.get("hair_removal") else {}
        # Likewise exposure normalisation: a record without it was made before the option, without it.
        legacy["white_level"] = 0
        legacy["clahe"] = 0.0
        return cls(**{**legacy, **d})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["resize_mode"] = str(self.resize_mode)
        d["hair_method"] = str(self.hair_method)
        return d

    @property
    def key(self) -> str:
        d = self.to_dict()
        # The method changes no pixel without hair removal, and `blackhat` was the only one before the
        # option existed: leaving it out of the hash then keeps the name of every cache built before.
        if not self.hair_removal or self.hair_method == HairMethod.blackhat:
            del d["hair_method"]
        # Likewise exposure normalisation, off in every cache built before the option existed.
        if not self.white_level:
            del d["white_level"]
        if not self.clahe:  # and local contrast equalisation
            del d["clahe"]
        payload = json.dumps({**d, "format": CACHE_FORMAT}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:10]

    @property
    def name(self) -> str:
        extras = ("-hair" if self.hair_removal else "") + ("-sog" if self.color_constancy else "") \
            + (f"-wl{self.white_level}" if self.white_level else "") + (f"-clahe{self.clahe:g}" if self.clahe else "")
        return f"{self.size}px-{self.resize_mode}{extras}-{self.key}"

    def decode_kwargs(self) -> dict:
        return {"resize_mode": self.resize_mode, "hair_removal": self.hair_removal,
                "color_constancy": self.color_constancy, "max_pixels": self.max_pixels,
                "hair_method": self.hair_method, "white_level": self.white_level,
                "clahe": self.clahe}


def default_workers() -> int:
    """Decoding processes when none are asked for: one per core, at most 8. Decoding is CPU-bound (the
    JPEG entropy pass), so a GPU machine's 16 cores prepare up to 4 times faster than 2 would; the cap bounds
    memory, since each worker holds a full-size decode (up to `max_pixels`)."""
    return max(1, min(8, os.cpu_count() or 1))


MAIN_GUARD = ('in a Python script, call prepare under `if __name__ == "__main__":` (decoding runs in spawned '
              "processes, and each one imports the script again: without the guard, its top level runs in every "
              "worker)")


def check_not_a_spawned_reimport() -> None:
    """Refuse to run while a spawned worker re-imports the parent's script (as `__mp_main__`) and that
    script's top level calls us: the script lacks its main guard, and going on would run a second
    prepare, writing to the same folders, in every worker."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__mp_main__":
            raise DataError(f"prepare was called while a decoding worker imported {frame.f_code.co_filename}: "
                            + MAIN_GUARD + ".")
        frame = frame.f_back


def file_signature(path: str) -> str:
    """Size and modification time: a changed file is decoded again, an unchanged one is reused."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _process_chunk(job: tuple[str, list[tuple[str, str, str]], dict]) -> str:
    """Decode one chunk of images and write it atomically as an .npz (runs in a worker process)."""
    out_path, rows, opts = job
    import cv2

    cv2.setNumThreads(1)  # one decode per core: no oversubscription on small machines
    options = CacheOptions.from_dict(opts)
    size = options.size
    pixels = np.zeros((len(rows), size, size, 3), np.uint8)
    info = []
    for i, (uid, path, signature) in enumerate(rows):
        entry = {"uid": uid, "path": path, "signature": signature, "status": "ok", "detail": "",
                 "width": -1, "height": -1, "content_hash": "", "phash": "", "ita": float("nan"), "ita_reason": "",
                 "ita_version": SKIN_TONE_VERSION}
        try:
            decoded = decode_file(path, size, **options.decode_kwargs(), skin_tone=True)
            pixels[i] = decoded.pixels
            entry.update(width=decoded.width, height=decoded.height, content_hash=decoded.content_hash,
                         phash=decoded.phash, ita=decoded.ita, ita_reason=decoded.ita_reason)
        except ImageRejected as exc:
            entry.update(status=exc.reason, detail=exc.detail)
        except Exception as exc:  # one bad image never kills a long run
            entry.update(status="decode-error", detail=f"{type(exc).__name__}: {exc}")
        info.append(entry)
    ok = [i for i, e in enumerate(info) if e["status"] == "ok"]
    with atomic_path(out_path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, pixels=pixels[ok], info=np.frombuffer(json.dumps(info).encode(), np.uint8))
    return out_path


def _read_chunk(path: Path) -> tuple[np.ndarray, list[dict]]:
    with np.load(path) as z:
        return z["pixels"], json.loads(z["info"].tobytes().decode())


@dataclass
class Cache:
    """An opened cache: `pixels` is a read-only memmap; `index` maps uid -> slot and image facts."""

    root: Path
    options: CacheOptions
    index: pd.DataFrame

    @classmethod
    def open(cls, root: Path) -> Cache:
        root = Path(root)
        if not (root / "meta.json").is_file() or not (root / "pixels.npy").is_file():
            raise DataError(f"{root}: not a complete melanogan cache (meta.json or pixels.npy missing). "
                            "Run `melanogan prepare` again to build it.")
        meta = read_json(root / "meta.json")
        index = pd.read_parquet(root / "index.parquet")
        if "ita_version" not in index.columns or (index["ita_version"] != SKIN_TONE_VERSION).any():
            # estimated by an older version (or not at all): not shown as current; `prepare` again renews it
            index = index.assign(ita=np.nan, ita_reason="skin tone from an older melanogan: run prepare again",
                                 ita_version=SKIN_TONE_VERSION)
        return cls(root=root, options=CacheOptions.from_dict(meta["options"]), index=index)

    @property
    def pixels(self) -> np.ndarray:
        return np.load(self.root / "pixels.npy", mmap_mode="r")

    def slots_for(self, uids: pd.Series) -> np.ndarray:
        """Slot of each uid in `pixels`; raises if any is not cached (cache older than the manifest)."""
        ok = self.index[self.index["slot"] >= 0].set_index("uid")["slot"]
        slots = ok.reindex(uids.to_numpy())
        if slots.isna().any():
            missing = uids[slots.isna().to_numpy()].tolist()[:3]
            raise DataError(f"{self.root}: {int(slots.isna().sum())} manifest image(s) are not in this cache "
                            f"(e.g. {', '.join(missing)}). Re-run `melanogan prepare` with the same options.")
        return slots.to_numpy(dtype=np.int64)


def build_cache(
    cache_root: Path,
    candidates: pd.DataFrame,
    options: CacheOptions,
    workers: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
    executor: Executor | None = None,
) -> Cache:
    """Decode every `candidates` row (`uid`, `path`) into the cache at `cache_root`, reusing what an
    earlier (possibly interrupted) build already decoded. Returns the opened cache.

    `executor`: an already running process pool to use instead of starting one (benchmarks, or
    callers that build several caches)."""
    cache_root = Path(cache_root)
    _recover_swap(cache_root)
    work = cache_root.parent / f".{cache_root.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    rows = [(u, p, file_signature(p)) for u, p in zip(candidates["uid"], candidates["path"], strict=True)]

    old_index = pd.DataFrame(columns=INDEX_COLUMNS)
    if (cache_root / "index.parquet").is_file():
        old_index = pd.read_parquet(cache_root / "index.parquet")
        if "ita_version" not in old_index.columns or (old_index["ita_version"] != SKIN_TONE_VERSION).any():
            old_index = pd.DataFrame(columns=INDEX_COLUMNS)  # an older skin-tone estimate: decode again, once
    old_by_key = {(u, p, s): i for i, (u, p, s) in
                  enumerate(zip(old_index["uid"], old_index["path"], old_index["signature"], strict=True))}
    todo = [r for r in rows if r not in old_by_key]
    if not todo and len(old_index) == len(rows):
        return Cache.open(cache_root)  # nothing changed

    # Chunks are named by their content so a resumed or re-run build finds the ones it already did.
    jobs, chunk_paths = [], []
    chunk_size = chunk_size_for(len(todo), workers)
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start:start + chunk_size]
        digest = hashlib.sha1(json.dumps([options.key, chunk]).encode()).hexdigest()[:16]
        path = work / f"{digest}.npz"
        chunk_paths.append(path)
        if not path.is_file():
            jobs.append((str(path), chunk, options.to_dict()))
    done = len(todo) - sum(len(j[1]) for j in jobs)
    if on_progress:
        on_progress(done, len(todo))
    if jobs:
        if executor is None and (workers <= 1 or len(jobs) == 1):  # a spawned worker costs ~1 s to start
            for job in jobs:
                _process_chunk(job)
                done += len(job[1])
                if on_progress:
                    on_progress(done, len(todo))
        else:
            # spawn: workers must not inherit a parent's torch/OpenMP thread state through fork.
            pool = executor or ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
            try:
                futures = {pool.submit(_process_chunk, job): len(job[1]) for job in jobs}
                for fut in as_completed(futures):
                    try:
                        fut.result()
                    except BrokenProcessPool as exc:
                        raise DataError(
                            f"a decoding worker process died ({exc}). Either {MAIN_GUARD}; or a worker ran out "
                            f"of memory: rerun with fewer workers (--workers 1). Chunks already decoded ({done} of "
                            f"{len(todo)} images) are kept in {work}; the next prepare goes on from them.") from None
                    done += futures[fut]
                    if on_progress:
                        on_progress(done, len(todo))
            finally:
                if executor is None:
                    pool.shutdown(cancel_futures=True)

    # Assemble the final array in candidate order into a new folder, then swap folders.
    new_info: dict[tuple, dict] = {}
    chunk_data: dict[tuple, tuple[Path, int]] = {}
    for path in chunk_paths:
        _, info = _read_chunk(path)
        ok_pos = 0
        for entry in info:
            key = (entry["uid"], entry["path"], entry["signature"])
            new_info[key] = entry
            if entry["status"] == "ok":
                chunk_data[key] = (path, ok_pos)
                ok_pos += 1
    records = []
    for key in rows:
        if key in old_by_key:
            records.append({**old_index.iloc[old_by_key[key]].to_dict(), "_from": "old"})
        else:
            records.append({**new_info[key], "_from": "new"})
    index = pd.DataFrame.from_records(records)
    is_ok = (index["status"] == "ok").to_numpy()
    index["slot"] = np.where(is_ok, np.cumsum(is_ok) - 1, -1)

    staging = cache_root.parent / f".{cache_root.name}.staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    size = options.size
    out = np.lib.format.open_memmap(staging / "pixels.npy", mode="w+", dtype=np.uint8,
                                    shape=(int(is_ok.sum()), size, size, 3))
    old_pixels = np.load(cache_root / "pixels.npy", mmap_mode="r") if (cache_root / "pixels.npy").is_file() else None
    loaded: dict[Path, np.ndarray] = {}
    for i, key in enumerate(rows):
        slot = int(index.at[i, "slot"])
        if slot < 0:
            continue
        if index.at[i, "_from"] == "old":
            out[slot] = old_pixels[int(old_index.iloc[old_by_key[key]]["slot"])]
        else:
            path, pos = chunk_data[key]
            if path not in loaded:
                loaded.clear()  # keep one chunk in memory at a time
                loaded[path] = _read_chunk(path)[0]
            out[slot] = loaded[path][pos]
    out.flush()
    del out, old_pixels
    index = index.drop(columns="_from")[INDEX_COLUMNS]
    index[["slot", "width", "height", "ita_version"]] = index[["slot", "width", "height", "ita_version"]].astype(
        np.int64)
    write_parquet(staging / "index.parquet", index)
    write_json(staging / "meta.json", {"format": CACHE_FORMAT, "options": options.to_dict(),
                                       "shape": [int(is_ok.sum()), size, size, 3], "dtype": "uint8",
                                       "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    _swap_in(staging, cache_root)
    shutil.rmtree(work, ignore_errors=True)
    return Cache.open(cache_root)


def chunk_size_for(n_images: int, workers: int) -> int:
    """Chunks small enough that each worker gets about four (load balance), at most CHUNK_SIZE
    (an interrupted run loses at most one chunk per worker)."""
    return max(1, min(CHUNK_SIZE, -(-n_images // (max(1, workers) * 4))))


def _swap_in(staging: Path, final: Path) -> None:
    old = final.parent / f".{final.name}.old"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def _recover_swap(final: Path) -> None:
    """A kill between the two renames of `_swap_in` leaves only `.old`: put it back."""
    old = final.parent / f".{final.name}.old"
    if not final.exists() and old.exists():
        os.replace(old, final)
