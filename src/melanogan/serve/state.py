"""The web app's state: the model, its thresholds, the image pools and the review database, built
once by `build_state` and shared by every route (request.app.state.review)."""

from __future__ import annotations

import random
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from melanogan.classify.predict import Predictor, gradcam, overlay, resolve_threshold
from melanogan.data.images import ImageRejected, decode_image
from melanogan.data.metadata import SITE_GROUPS
from melanogan.errors import MelanoganError
from melanogan.fileio import read_json
from melanogan.serve.pools import ImagePool, LruCache, png_bytes
from melanogan.serve.store import ReviewStore
from melanogan.serve.web import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_MB,
    FORM_OVERHEAD,
    LOOPBACK_HOSTS,
    UserError,
    clean_metadata,
)

# Concurrent decodes: each may hold up to max_pixels x 3 bytes (300 MB at the default) while it runs,
# so 40 large uploads at once wait their turn instead of exhausting memory.
DECODE_SLOTS = 2
DIAGNOSES = ("melanoma", "nevus", "seborrheic or benign keratosis", "basal cell carcinoma",
             "squamous cell carcinoma", "actinic keratosis", "dermatofibroma", "vascular lesion", "other", "unsure")


@dataclass
class ServeConfig:
    run_dir: Path
    db: Path
    synthetic_dir: Path | None = None
    real_dir: Path | None = None
    threshold: str = "val-youden"
    site: str | None = None  # a site calibrated with `melanogan calibrate`: its temperature and thresholds
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    max_pixels: int = DEFAULT_MAX_PIXELS
    turing_per_class: int = 200
    review_items: int = 200
    device: str = "cpu"
    admin_token: str | None = None  # organiser's token for results and CSVs; None: a random one per start
    host: str = "127.0.0.1"  # the address served on: requests must name it (or a loopback name) as Host
    allowed_hosts: tuple[str, ...] = ()  # further Host names clients use (needed when bound to 0.0.0.0)

    def hosts(self) -> set[str]:
        """Host names a request may carry (DNS-rebinding defence)."""
        names = {*LOOPBACK_HOSTS, *self.allowed_hosts}
        if self.host not in ("0.0.0.0", "::", ""):
            names.add(self.host)
        return {n.strip("[]").lower() for n in names}


class ReviewApp:
    """State shared by the routes: the model, the image pools and the database."""

    site_groups = SITE_GROUPS  # the predict form's choices for a model trained with metadata

    def __init__(self, cfg: ServeConfig, predictor: Predictor, threshold: tuple[str, float], store: ReviewStore,
                 real: ImagePool | None = None, synthetic: ImagePool | None = None, display_size: int = 0):
        """The parts, already built (see `build_state`): nothing is loaded or written here."""
        self.cfg = cfg
        self.admin_token = cfg.admin_token or secrets.token_urlsafe(18)
        self.decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)
        self.predictor = predictor
        self.threshold_name, self.threshold = threshold
        self.model_lock = threading.Lock()  # Grad-CAM hooks the model: one request at a time uses it
        self.store = store
        self.rng = random.SystemRandom()
        self.real, self.synthetic, self.display_size = real, synthetic, display_size
        self._review_scores: LruCache[tuple[float, bytes]] = LruCache(256)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.cfg.max_upload_mb * 1e6) + FORM_OVERHEAD

    # model -----------------------------------------------------------------------------------
    def score(self, pixels, x: torch.Tensor, with_cam: bool = True,
              metadata: dict | None = None) -> tuple[float, bytes | None]:
        """Melanoma probability of one preprocessed image, and its Grad-CAM overlay as PNG. `metadata`
        (age, sex, anatom_site; any missing) for a model trained with it."""
        meta = pd.DataFrame([metadata]) if metadata else None
        with self.model_lock:
            logit = float(self.predictor.logits(x[None], meta)[0])
            cam = gradcam(self.predictor.model, x) if with_cam else None
        return float(self.predictor.probability(logit)), (png_bytes(overlay(pixels, cam)) if cam is not None else None)

    def decision(self, probability: float) -> str:
        return "melanoma" if probability >= self.threshold else "not melanoma"

    def predict_upload(self, data: bytes, with_cam: bool = True, metadata: dict | None = None) -> dict:
        if not data:
            raise UserError(400, "The upload is empty: choose a dermoscopic image file.")
        opts = self.predictor.options
        try:
            with self.decode_slots:
                decoded = decode_image(data, opts.size, **{**opts.decode_kwargs(), "max_pixels": self.cfg.max_pixels})
        except ImageRejected as exc:
            status = {"decompression-bomb": 413, "not-an-image": 415}.get(exc.reason, 422)
            raise UserError(status, f"Not a usable image ({exc.reason}): {exc.detail}. "
                                    "Upload a JPEG or PNG dermoscopic image.") from exc
        pixels = decoded.pixels
        x = self.predictor.transform(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
        metadata = clean_metadata(metadata) if self.predictor.cfg.metadata else {}
        probability, cam_png = self.score(pixels, x, with_cam, metadata)
        return {"metadata": metadata or "missing" if self.predictor.cfg.metadata else "not used",
                "probability": probability, "decision": self.decision(probability), "threshold": self.threshold,
                "threshold_name": self.threshold_name, "width": decoded.width, "height": decoded.height,
                "pixels": pixels, "gradcam_png": cam_png}

    def review_score(self, item) -> tuple[float, bytes]:
        """Model probability and Grad-CAM of a review item, preprocessed exactly as in training."""
        return self._review_scores.get(item["item_id"], lambda: self._score_review_item(item))

    def _score_review_item(self, item) -> tuple[float, bytes]:
        assert self.real is not None
        opts = self.predictor.options
        if self.real.cache.options.key == opts.key:
            pixels = self.real.pixels(item["uid"])
        else:  # the run was trained with other preprocessing: decode the original file its way
            try:
                pixels = decode_image(Path(self.real.path(item["uid"])).read_bytes(), opts.size,
                                      **opts.decode_kwargs()).pixels
            except (OSError, ImageRejected) as exc:
                raise UserError(404, f"Image {item['item_id']} cannot be read any more ({exc}).") from exc
        x = self.predictor.transform(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
        return self.score(pixels, x)

    def item(self, task: str, public_id: str, hint: str = "", reviewer: str | None = None):
        """The item behind a reviewer's public id, if it belongs to `task` (and to `reviewer` when given)
        and to a dataset this server shows."""
        owner = self.store.resolve_public(public_id)
        item = self.store.item(owner["item_id"]) if owner is not None else None
        if item is not None and item["task"] == task and reviewer in (None, owner["reviewer"]):
            pool = self.synthetic if item["pool"] == "synthetic" else self.real
            if pool is not None and pool.key == item["dataset"]:
                return item
        raise UserError(404, f"Unknown image id.{hint}")

    # Turing test -----------------------------------------------------------------------------
    def turing_items(self) -> list:
        if self.synthetic is None or self.real is None:
            raise UserError(404, "The visual Turing test is off: start the server with --synthetic SYN_DIR "
                                 "(from `melanogan generate`) and --real DATA_DIR.")
        pools = {(p.kind, p.key): p for p in (self.real, self.synthetic)}
        return [i for i in self.store.items("turing")
                if (i["pool"], i["dataset"]) in pools and pools[(i["pool"], i["dataset"])].has(i["uid"])]

    def check_token(self, token: str | None) -> None:
        if not token or not secrets.compare_digest(token.encode(), self.admin_token.encode()):
            raise UserError(403, "Results are for the organiser: open the results link that `melanogan serve` "
                                 "printed when it started (it carries the organiser token).")

    def pool_of(self, item) -> ImagePool:
        pool = self.synthetic if item["pool"] == "synthetic" else self.real
        assert pool is not None  # `item()` only returns items of the pools this server shows
        return pool

    def next_turing_item(self, reviewer: str):
        """A random unanswered item: class first, then real or synthetic with equal chance, so the
        mix is balanced whatever the pool sizes."""
        answered = self.store.answered_item_ids("turing", reviewer)
        remaining = [i for i in self.turing_items() if i["item_id"] not in answered]
        if not remaining:
            return None, len(answered)
        label = self.rng.choice(sorted({i["label"] for i in remaining}))
        in_label = [i for i in remaining if i["label"] == label]
        pool = self.rng.choice(sorted({i["pool"] for i in in_label}))
        return self.rng.choice([i for i in in_label if i["pool"] == pool]), len(answered)

    def next_review_item(self, reviewer: str):
        if self.real is None:
            raise UserError(404, "Prediction review is off: start the server with --real DATA_DIR.")
        answered = self.store.answered_item_ids("review", reviewer)
        items = [i for i in self.store.items("review", self.real.key) if self.real.has(i["uid"])]
        if not items:
            raise UserError(404, f"{self.real.data_dir} has no test split to review.")
        remaining = [i for i in items if i["item_id"] not in answered]
        return (self.rng.choice(remaining) if remaining else None), len(answered), len(items)


def build_state(cfg: ServeConfig) -> ReviewApp:
    """Load the model and thresholds, open the database and the image pools, and register the items
    the Turing test and the review show (idempotent: a restart registers nothing new)."""
    predictor = Predictor(cfg.run_dir, device=cfg.device, site=cfg.site)
    threshold = resolve_threshold(cfg.run_dir, cfg.threshold, site=cfg.site)
    store = ReviewStore(cfg.db)
    real = synthetic = None
    real_dir = cfg.real_dir
    if real_dir is None:  # default: the data the model was trained on (its test split is unseen)
        trained_on = Path(read_json(Path(cfg.run_dir) / "run.json").get("data_dir", ""))
        real_dir = trained_on if (trained_on / "manifest.parquet").is_file() else None
    if real_dir is not None:
        real = ImagePool(real_dir, "real")
    if cfg.synthetic_dir is not None:
        if real is None:
            raise MelanoganError("--synthetic needs real images to mix with: pass --real DATA_DIR.")
        synthetic = ImagePool(cfg.synthetic_dir, "synthetic")
    display_size = 0
    if synthetic is not None and real is not None:
        # Real and synthetic images are shown at the same, lower resolution: the synthetic images'
        # true resolution (not their upsampled cache), so sharpness cannot give them away.
        display_size = min(synthetic.native_resolution(), real.cache_size)
        register_turing_items(store, real, synthetic, cfg.turing_per_class)
    if real is not None:
        register_review_items(store, real, cfg.review_items)
    return ReviewApp(cfg, predictor, threshold, store, real, synthetic, display_size)


def register_turing_items(store: ReviewStore, real: ImagePool, synthetic: ImagePool, per_class: int) -> None:
    """As many real as synthetic images of each class the generator made (a fixed seed picks them)."""
    real_counts = real.rows["label"].value_counts()
    for label, n_syn in synthetic.rows["label"].value_counts().items():
        n = min(per_class, int(n_syn), int(real_counts.get(label, 0)))
        for pool in (real, synthetic):
            chosen = pool.sample(n, labels={int(label)})
            store.register_items("turing", pool.key, [
                (pool.kind, r.uid, int(r.label), str(r.diagnosis)) for r in chosen.itertuples()])


def register_review_items(store: ReviewStore, real: ImagePool, n_items: int) -> None:
    """Up to half melanomas from the real test split (images the model never trained on), the rest other."""
    test = real.rows[real.rows["split"] == "test"]
    if test.empty:
        return
    n_mel = min(int((test["label"] == 1).sum()), n_items // 2)
    for part in (real.sample(n_mel, labels={1}, splits=("test",)),
                 real.sample(n_items - n_mel, labels={0}, splits=("test",))):
        store.register_items("review", real.key, [("real", r.uid, int(r.label), str(r.diagnosis))
                                                  for r in part.itertuples()])
