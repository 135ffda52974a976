"""A PyTorch Dataset over manifest + cache: any split, any model size, constant memory."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from melanogan.data.cache import Cache
from melanogan.data.manifest import default_cache, load_manifest
from melanogan.data.transforms import eval_preset
from melanogan.errors import DataError


class CachedImageDataset(Dataset):
    """Images of the chosen split(s) as (C, H, W) tensors with int labels.

    Pixels come from the memory-mapped cache, opened lazily in each DataLoader worker, so memory
    does not grow with dataset size and no JPEG is decoded here.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str | Sequence[str] = "train",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        image_size: int | None = None,
        cache: Cache | None = None,
        labels: Sequence[int] | None = None,
        manifest: pd.DataFrame | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.cache = cache or default_cache(self.data_dir)
        frame = manifest if manifest is not None else load_manifest(self.data_dir)
        splits = [split] if isinstance(split, str) else list(split)
        if splits != ["all"]:
            frame = frame[frame["split"].isin(splits)]
        if labels is not None:
            frame = frame[frame["label"].isin(list(labels))]
        self.rows = frame.reset_index(drop=True)
        if len(self.rows) == 0:
            raise DataError(f"{self.data_dir}: no images in split {'/'.join(splits)}"
                            + (f" with labels {list(labels)}" if labels is not None else "") + ".")
        self.slots = self.cache.slots_for(self.rows["uid"])
        self.labels = self.rows["label"].to_numpy(np.int64)
        self.transform = transform or eval_preset(image_size or self.cache.options.size)
        self._pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def pixels(self) -> np.ndarray:
        if self._pixels is None:  # opened per process: memmaps do not survive pickling to workers well
            self._pixels = self.cache.pixels
        return self._pixels

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pixels"] = None
        return state

    def raw(self, index: int) -> torch.Tensor:
        """The cached uint8 image as a (3, S, S) tensor, before any transform."""
        return torch.from_numpy(np.array(self.pixels[self.slots[index]])).permute(2, 0, 1)  # copy: memmap is read-only

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.raw(index)), int(self.labels[index])
