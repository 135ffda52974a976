"""Image pools for the web app: a prepared dataset (manifest + cache) or a synthetic set from
`melanogan generate`, read from their uint8 caches and rendered to PNG at a chosen size."""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from threading import Lock
from typing import Generic, TypeVar

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from melanogan.data.manifest import default_cache, load_manifest
from melanogan.errors import MelanoganError
from melanogan.fileio import read_json

V = TypeVar("V")


class LruCache(Generic[V]):
    """A small thread-safe least-recently-used cache; values are computed outside the lock (two
    threads may compute the same value once each; both results are identical)."""

    def __init__(self, max_items: int):
        self.max_items = max_items
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = Lock()

    def get(self, key: Hashable, compute: Callable[[], V]) -> V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return value


class ImagePool:
    """The labelled images of one prepared (or synthetic) data folder."""

    def __init__(self, data_dir: Path, kind: str):
        self.data_dir = Path(data_dir).resolve()
        self.kind = kind  # "real" or "synthetic"
        if not (self.data_dir / "manifest.parquet").is_file():
            what = "`melanogan generate`" if kind == "synthetic" else "`melanogan prepare`"
            raise MelanoganError(f"{data_dir}: no manifest.parquet here; pass a folder written by {what}.")
        frame = load_manifest(self.data_dir)
        self.rows = frame[frame["split"] != "unlabeled"].reset_index(drop=True)
        if self.rows.empty:
            raise MelanoganError(f"{data_dir}: no labelled images.")
        self.cache = default_cache(self.data_dir)
        self._slots = pd.Series(self.cache.slots_for(self.rows["uid"]), index=self.rows["uid"].to_numpy())
        self._pixels = self.cache.pixels
        self._png: LruCache[bytes] = LruCache(512)

    @property
    def key(self) -> str:
        """Identifies the dataset in the database (its resolved folder)."""
        return str(self.data_dir)

    @property
    def cache_size(self) -> int:
        return self.cache.options.size

    def native_resolution(self) -> int:
        """The resolution the images really have: a synthetic set's generator resolution (its PNGs are
        upsampled to the real cache size), else the cache size."""
        if self.kind == "synthetic":
            info_path = self.data_dir / "prepare.json"
            gan_cfg = Path(read_json(info_path).get("gan_run", "")) / "config.yaml" if info_path.is_file() else None
            if gan_cfg is not None and gan_cfg.is_file():
                resolution = (yaml.safe_load(gan_cfg.read_text()) or {}).get("resolution")
                if isinstance(resolution, int) and resolution > 0:
                    return min(resolution, self.cache_size)
        return self.cache_size

    def has(self, uid: str) -> bool:
        return uid in self._slots.index

    def pixels(self, uid: str) -> np.ndarray:
        """(S, S, 3) uint8 copy of the cached image."""
        return np.array(self._pixels[int(self._slots[uid])])

    def path(self, uid: str) -> str:
        return str(self.rows.loc[self.rows["uid"] == uid, "path"].iloc[0])

    def png(self, uid: str, size: int) -> bytes:
        """PNG bytes of the image resized to `size` (kept in a small in-memory LRU)."""

        def render() -> bytes:
            img = Image.fromarray(self.pixels(uid))
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.LANCZOS)
            return png_bytes(np.asarray(img))

        return self._png.get((uid, size), render)

    def sample(self, per_label: int, labels: set[int] | None = None, splits: tuple[str, ...] | None = None,
               seed: int = 0) -> pd.DataFrame:
        """Up to `per_label` rows of each label, chosen with a fixed seed (the same on every start)."""
        rows = self.rows
        if splits is not None:
            rows = rows[rows["split"].isin(splits)]
        if labels is not None:
            rows = rows[rows["label"].isin(sorted(labels))]
        parts = [g.sample(n=min(per_label, len(g)), random_state=seed) for _, g in rows.groupby("label")]
        return pd.concat(parts).sort_values("uid") if parts else rows.iloc[:0]


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
