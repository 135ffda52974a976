"""Near-duplicate detection (perceptual hash) and the clusters that must share a split."""

from __future__ import annotations

import numpy as np
import pandas as pd

# Of 256 bits. Measured on ../shared/data (HAM10000 squashed to 224px vs the ISIC 9-class set
# centre-cropped to 180px; 8,343 images, 743 photographs in both): at 22 bits every shared
# photograph is paired, and 11 other pairs out of ~35 million are (at 12 bits: 674 of 743).
DEFAULT_PHASH_DISTANCE = 22


class UnionFind:
    """Disjoint sets over hashable keys."""

    def __init__(self) -> None:
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # deterministic representative


def _words(hex_hashes: np.ndarray) -> np.ndarray:
    """Hex strings (views x 256 bits) -> uint64 array (N, views, 4)."""
    raw = np.frombuffer(b"".join(bytes.fromhex(h) for h in hex_hashes), dtype=">u8").astype(np.uint64)
    return raw.reshape(len(hex_hashes), -1, 4)


def hamming_pairs(hex_hashes: np.ndarray, max_distance: int, block: int = 256) -> np.ndarray:
    """Index pairs (i < j, distance) whose whole-image hash is within `max_distance` bits of any
    view hash of the other image (in either direction).

    Exact and blocked: memory O(block * N * views), time O(N^2 * views)."""
    n = len(hex_hashes)
    if n < 2:
        return np.zeros((0, 3), np.int64)
    words = _words(np.asarray(hex_hashes))
    views = words.shape[1]
    flat = words.reshape(n * views, 4)
    best = []
    for start in range(0, n, block):
        whole = words[start:start + block, 0]  # (b, 4)
        dist = np.zeros((len(whole), n * views), np.uint16)
        for k in range(4):
            dist += np.bitwise_count(whole[:, k, None] ^ flat[None, :, k]).astype(np.uint16)
        dist = dist.reshape(len(whole), n, views).min(axis=2)
        i, j = np.nonzero(dist <= max_distance)
        keep = (i + start) != j
        best.append(np.column_stack([i[keep] + start, j[keep], dist[i[keep], j[keep]]]))
    found = np.concatenate(best)
    # (i, j) and (j, i) may both be found with different distances: keep the smaller, once.
    lo, hi = np.minimum(found[:, 0], found[:, 1]), np.maximum(found[:, 0], found[:, 1])
    order = np.lexsort((found[:, 2], hi, lo))
    found = np.column_stack([lo, hi, found[:, 2]])[order]
    first = np.ones(len(found), bool)
    first[1:] = (np.diff(found[:, 0]) != 0) | (np.diff(found[:, 1]) != 0)
    return found[first].astype(np.int64)


def near_duplicate_pairs(df: pd.DataFrame, max_distance: int = DEFAULT_PHASH_DISTANCE) -> pd.DataFrame:
    """Pairs of rows whose images are perceptually the same photograph (exact copies included)."""
    pairs = hamming_pairs(df["phash"].to_numpy(), max_distance)
    uids = df["uid"].to_numpy()
    return pd.DataFrame({"uid_a": uids[pairs[:, 0]], "uid_b": uids[pairs[:, 1]],
                         "phash_distance": pairs[:, 2].astype(int), "evidence": "perceptual-hash"})
