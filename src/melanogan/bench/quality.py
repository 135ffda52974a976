"""`melanogan bench quality`: feature extraction and metric computation at N = 1,000 vs 5,000 images
(real and synthetic each): time and peak memory, each size measured in a fresh process so the peak
resident memory belongs to that size alone. KID works on bounded subsets and the nearest-neighbour
metrics are blocked, so memory should grow about linearly with N, not quadratically."""

from __future__ import annotations

import resource
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import torch


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random colour fields (uint8), cheap to make and not trivially identical."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8).float()
    return torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear").round().byte()


class _Penultimate(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def _metric_seconds(row: dict) -> float:
    return sum(v for k, v in row.items() if k.endswith("_s") and k != "features_s")


def _measure(args: tuple[int, str, int]) -> dict:
    n, extractor_name, size = args
    from melanogan.classify.models import create_classifier
    from melanogan.gan import quality as Q
    from melanogan.gan.features import FeatureExtractor, create_extractor

    torch.set_num_threads(2)
    if extractor_name == "pixels":
        extractor = create_extractor("pixels")
    else:  # the penultimate layer of a (randomly initialised) small-cnn: domain-feature shapes and cost
        model = create_classifier("small-cnn", 128).eval()
        extractor = FeatureExtractor("small-cnn-penultimate", 128, "bilinear-antialias", _Penultimate(model))
    timings = {}
    t0 = time.perf_counter()
    feats = []
    for seed in (1, 2):
        images = _images(n, size, seed)
        out = [extractor(images[s:s + 256]).numpy() for s in range(0, n, 256)]
        feats.append(np.concatenate(out))
        del images
    timings["features_s"] = time.perf_counter() - t0
    real, fake = feats
    for name, fn in (("fid_s", lambda: Q.fid(real, fake)), ("kid_s", lambda: Q.kid(real, fake)),
                     ("precision_recall_s", lambda: Q.precision_recall(real, fake)),
                     ("density_coverage_s", lambda: Q.density_coverage(real, fake)),
                     ("memorisation_s", lambda: Q.memorisation(real, fake))):
        t0 = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - t0
    return {"n": n, "extractor": extractor.name, "dim": int(real.shape[1]),
            **{k: round(v, 2) for k, v in timings.items()},
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run(sizes: tuple[int, ...] = (1000, 5000), extractors: tuple[str, ...] = ("pixels", "small-cnn"),
        image_size: int = 128) -> dict:
    results = []
    for extractor in extractors:
        for n in sizes:
            with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                results.append(pool.submit(_measure, (n, extractor, image_size)).result())
    growth = {}
    for extractor in {r["extractor"] for r in results}:
        rows = sorted((r for r in results if r["extractor"] == extractor), key=lambda r: r["n"])
        if len(rows) >= 2:
            a, b = rows[0], rows[-1]
            growth[extractor] = {"n_ratio": b["n"] / a["n"],
                                 "peak_rss_ratio": round(b["peak_rss_mb"] / a["peak_rss_mb"], 2),
                                 "metric_time_ratio": round(_metric_seconds(b) / max(1e-9, _metric_seconds(a)), 2)}
    return {"image_size": image_size, "runs": results, "growth": growth}
