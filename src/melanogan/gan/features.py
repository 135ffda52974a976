"""Feature extractors for quality metrics (a registry): `pixels`, `inception`, `classifier:RUN_DIR`.

Every extractor records what a score depends on: its name, weights, input size and resize method.
Real-set features are cached under `DATA_DIR/features/<hash>.npz`, keyed by a hash of the images
(uids + content hashes), the extractor and its preprocessing, and written atomically.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from melanogan.data.dataset import CachedImageDataset
from melanogan.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from melanogan.errors import MelanoganError
from melanogan.fileio import atomic_path


@dataclass
class FeatureExtractor:
    name: str
    input_size: int
    resize: str
    fn: nn.Module | None = None
    weights: str = "none"
    info: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"extractor": self.name, "weights": self.weights, "input_size": self.input_size,
                "resize": self.resize, **self.info}

    @torch.no_grad()
    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 -> (N, D) float features."""
        if self.name == "inception":  # the FID network takes uint8 at any size and resizes like TF
            return self.fn(images_uint8)[0].float()
        x = images_uint8.float() / 255.0
        if self.name == "pixels":
            return F.interpolate(x, size=(self.input_size, self.input_size), mode="area").flatten(1)
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                          antialias=True)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return self.fn((x - mean) / std).float()


# The standard FID network: TF-Inception (2015-12-05) as converted by torch-fidelity, the weights and
# TF-compatible resizing that pytorch-fid, torch-fidelity and clean-fid's legacy mode share, so our
# FID can be compared with a paper's.
FID_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                   "weights-inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


def fid_inception_state(weights: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The FID Inception state dict: from `weights` (.safetensors or a torch file of tensors), else
    from the torch hub cache, else downloaded into it. Read as tensors only, never unpickled."""
    from melanogan.classify.models import read_weights_file

    if weights:
        return read_weights_file(Path(weights)), str(weights)
    path = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(path), progress=False)
        except Exception as exc:
            raise MelanoganError(
                f"could not download the FID Inception weights ({type(exc).__name__}: {exc}). Offline? Download "
                f"{FID_WEIGHTS_URL} on a machine that is online and pass it with --inception-weights FILE (or put it "
                f"at {path}).") from exc
    return read_weights_file(path), FID_WEIGHTS_URL


def _inception(weights: str | None) -> FeatureExtractor:
    import tempfile

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    state, origin = fid_inception_state(weights)
    # torch-fidelity unpickles the file it is given (weights_only=False): it only ever gets this one,
    # written here from the tensors just read safely.
    with tempfile.TemporaryDirectory() as tmp:
        own = Path(tmp) / "inception.pth"
        torch.save({k: v.contiguous() for k, v in state.items()}, own)
        try:
            model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                feature_extractor_weights_path=str(own))
        except RuntimeError as exc:
            raise MelanoganError(f"{origin}: not the FID Inception-v3 weights ({str(exc).splitlines()[0][:300]}). "
                                 f"Use {FID_WEIGHTS_FILE} ({FID_WEIGHTS_URL}).") from exc
    digest = hashlib.sha256(b"".join(v.numpy().tobytes()[:4096] for v in list(state.values())[:8])).hexdigest()[:12]
    return FeatureExtractor("inception", 299, "tf1-bilinear (torch-fidelity)", model, origin,
                            {"weights_digest": digest, "layer": "pool3 (2048-d)",
                             "network": "torch-fidelity inception-v3-compat"})


def _classifier(run_dir: Path) -> FeatureExtractor:
    from melanogan.classify.train import load_model

    model, cfg, state = load_model(Path(run_dir) / "best")

    class Penultimate(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.forward_features(x)

    return FeatureExtractor(f"classifier:{Path(run_dir).resolve()}", cfg.image_size, "bilinear-antialias",
                            Penultimate(model).eval(), f"{cfg.model} epoch {state.get('epoch')}",
                            {"layer": "penultimate"})


def create_extractor(name: str, inception_weights: str | None = None) -> FeatureExtractor:
    """`pixels`, `inception` (weights from a file or the torch cache/download), `classifier:RUN_DIR`."""
    if name == "pixels":
        return FeatureExtractor("pixels", 32, "area")
    if name == "inception":
        return _inception(inception_weights)
    if name.startswith("classifier:"):
        return _classifier(Path(name.split(":", 1)[1]))
    raise MelanoganError(f"unknown feature extractor {name!r}; use pixels, inception or classifier:RUN_DIR.")


def dataset_features(ds: CachedImageDataset, extractor: FeatureExtractor, batch_size: int = 64,
                     cache_dir: Path | None = None) -> np.ndarray:
    """Features of every image of `ds`, from the cache when the same images and extractor were seen."""
    key_src = json.dumps({"extractor": extractor.describe(),
                          "images": (ds.rows["uid"] + ":" + ds.rows["content_hash"].astype(str)).tolist(),
                          "cache": ds.cache.options.to_dict()}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{key}.npz" if cache_dir else None
    if path and path.is_file():
        with np.load(path) as z:
            return z["features"]
    feats = []
    for start in range(0, len(ds), batch_size):
        batch = torch.stack([ds.raw(i) for i in range(start, min(len(ds), start + batch_size))])
        feats.append(extractor(batch).numpy())
    out = np.concatenate(feats).astype(np.float32)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, features=out)
    return out
