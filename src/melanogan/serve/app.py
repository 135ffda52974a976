"""The FastAPI application behind `melanogan serve`.

Pages are rendered on the server (Jinja2, no front-end build). Uploaded bytes are parsed and decoded
in memory (the multipart parser never spools them to a file: the body limit caps their size) with the
same guarded decoder as `prepare` (size limit, decompression-bomb check), a few decodes at a time;
uploaded file names are never used. Images shown to reviewers are addressed by random ids that
differ per reviewer, so a page reveals neither a path nor whether an image is real or synthetic, and
reviewers cannot pool answers by id. Results and CSVs need the organiser's token; POSTs from other
sites and requests for unknown Host names are refused.
"""

from __future__ import annotations

import base64
import csv
import io
import math
import random
import secrets
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pandas as pd
import torch
from fastapi import FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartException, MultiPartParser

from melanogan import __version__
from melanogan.classify.predict import Predictor, gradcam, overlay, resolve_threshold
from melanogan.data.images import ImageRejected, decode_image
from melanogan.data.metadata import SITE_GROUPS
from melanogan.errors import MelanoganError
from melanogan.fileio import read_json
from melanogan.serve.pools import ImagePool, LruCache, png_bytes
from melanogan.serve.stats import accuracy
from melanogan.serve.store import ReviewStore

DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_PIXELS = 100_000_000  # a 10,000 x 10,000 image; larger headers are decompression bombs
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small form fields around an upload
# Concurrent decodes: each may hold up to max_pixels x 3 bytes (300 MB at the default) while it runs,
# so 40 large uploads at once wait their turn instead of exhausting memory.
DECODE_SLOTS = 2
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
CSV_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
DIAGNOSES = ("melanoma", "nevus", "seborrheic or benign keratosis", "basal cell carcinoma",
             "squamous cell carcinoma", "actinic keratosis", "dermatofibroma", "vascular lesion", "other", "unsure")
_TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


class UserError(Exception):
    """A request we refuse, with the HTTP status and a message saying what to do."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


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


def _hostname(netloc: str) -> str:
    """`host:port` or `[v6]:port` -> host, lower case."""
    try:
        return (urlsplit(f"//{netloc}").hostname or "").lower()
    except ValueError:
        return ""


class SiteGuard:
    """ASGI middleware against other web pages and DNS rebinding: a request whose Host is not one of
    ours gets 400; a POST whose Origin (or, without one, Referer) is not this server gets 403.
    Browsers send Origin with every cross-site POST, so a page elsewhere cannot submit answers to
    127.0.0.1; clients that send neither (curl, scripts) are not a browser acting for someone."""

    def __init__(self, app, hosts: set[str]):
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if _hostname(host) not in self.hosts:
            response = _error_response(scope["path"], 400, f"Unknown host {host[:80]!r}: this server answers to "
                                       f"{', '.join(sorted(self.hosts))} (see --allowed-host).")
            return await response(scope, receive, send)
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin") or headers.get("referer")
            if origin is not None and (origin == "null" or urlsplit(origin).netloc.lower() != host.lower()):
                response = _error_response(scope["path"], 403, "Cross-site request refused: answers can only be "
                                           "sent from this server's own pages.")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: refuses a request body over `max_bytes` with 413 before the app sees it,
    whether or not the client announced its length (chunked uploads are counted as they arrive)."""

    def __init__(self, app, max_bytes: int, limit_mb: float):
        self.app = app
        self.max_bytes = max_bytes
        self.limit_mb = limit_mb

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._too_large(scope, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large(scope, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, send):
        limit = f"{self.limit_mb:g} MB"
        response = _error_response(scope["path"], 413, f"The upload is larger than the server's limit of {limit}. "
                                                        "Send a smaller image (dermoscopic JPEGs are a few MB).")
        await response(scope, _empty_receive, send)


async def _empty_receive():
    return {"type": "http.disconnect"}


def _error_response(path: str, status: int, message: str) -> Response:
    if path.startswith("/api/"):
        return JSONResponse({"detail": message}, status_code=status)
    body = _TEMPLATES.get_template("error.html").render(status=status, message=message, version=__version__)
    return HTMLResponse(body, status_code=status)


def clean_reviewer(name: str | None) -> str:
    """A reviewer's name as stored: trimmed, 1-64 printable characters."""
    name = unicodedata.normalize("NFC", (name or "").strip())
    if not name:
        raise UserError(422, "Enter your name (it identifies your answers).")
    if len(name) > 64 or any(unicodedata.category(c).startswith("C") for c in name):
        raise UserError(422, "A reviewer name has at most 64 printable characters.")
    return name


class ReviewApp:
    """State shared by the routes: the model, the image pools and the database."""

    site_groups = SITE_GROUPS  # the predict form's choices for a model trained with metadata

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.admin_token = cfg.admin_token or secrets.token_urlsafe(18)
        self.decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)
        self.predictor = Predictor(cfg.run_dir, device=cfg.device, site=cfg.site)
        self.threshold_name, self.threshold = resolve_threshold(cfg.run_dir, cfg.threshold, site=cfg.site)
        self.model_lock = threading.Lock()  # Grad-CAM hooks the model: one request at a time uses it
        self.store = ReviewStore(cfg.db)
        self.rng = random.SystemRandom()
        self.real: ImagePool | None = None
        self.synthetic: ImagePool | None = None
        real_dir = cfg.real_dir
        if real_dir is None:  # default: the data the model was trained on (its test split is unseen)
            trained_on = Path(read_json(Path(cfg.run_dir) / "run.json").get("data_dir", ""))
            real_dir = trained_on if (trained_on / "manifest.parquet").is_file() else None
        if real_dir is not None:
            self.real = ImagePool(real_dir, "real")
        if cfg.synthetic_dir is not None:
            if self.real is None:
                raise MelanoganError("--synthetic needs real images to mix with: pass --real DATA_DIR.")
            self.synthetic = ImagePool(cfg.synthetic_dir, "synthetic")
        self.display_size = 0
        if self.synthetic is not None and self.real is not None:
            # Real and synthetic images are shown at the same, lower resolution: the synthetic images'
            # true resolution (not their upsampled cache), so sharpness cannot give them away.
            self.display_size = min(self.synthetic.native_resolution(), self.real.cache_size)
            # As many real as synthetic images of each class the generator made (a fixed seed picks them).
            real_counts = self.real.rows["label"].value_counts()
            for label, n_syn in self.synthetic.rows["label"].value_counts().items():
                n = min(cfg.turing_per_class, int(n_syn), int(real_counts.get(label, 0)))
                for pool in (self.real, self.synthetic):
                    chosen = pool.sample(n, labels={int(label)})
                    self.store.register_items("turing", pool.key, [
                        (pool.kind, r.uid, int(r.label), str(r.diagnosis)) for r in chosen.itertuples()])
        if self.real is not None:
            test = self.real.rows[self.real.rows["split"] == "test"]
            if not test.empty:
                n_mel = min(int((test["label"] == 1).sum()), cfg.review_items // 2)
                chosen = [self.real.sample(n_mel, labels={1}, splits=("test",)),
                          self.real.sample(cfg.review_items - n_mel, labels={0}, splits=("test",))]
                for part in chosen:
                    self.store.register_items("review", self.real.key, [
                        ("real", r.uid, int(r.label), str(r.diagnosis)) for r in part.itertuples()])
        self._review_scores: LruCache[tuple[float, bytes]] = LruCache(256)

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


def turing_summary(rows) -> list[dict]:
    """Per reviewer: overall accuracy, on real and on synthetic images, and per class, with exact CIs."""
    out = []
    for reviewer in sorted({r["reviewer"] for r in rows}):
        mine = [r for r in rows if r["reviewer"] == reviewer]
        groups = [("all images", mine),
                  ("real images", [r for r in mine if r["truth"] == "real"]),
                  ("synthetic images", [r for r in mine if r["truth"] == "synthetic"]),
                  ("melanoma", [r for r in mine if r["label"] == 1]),
                  ("not melanoma", [r for r in mine if r["label"] == 0])]
        parts = []
        for name, group in groups:
            if not group and name != "all images":
                continue
            acc = accuracy(sum(int(r["correct"]) for r in group), len(group))
            conf = sum(r["confidence"] for r in group) / len(group) if group else math.nan
            parts.append({"group": name, "acc": acc, "mean_confidence": conf})
        out.append({"reviewer": reviewer, "groups": parts})
    return out


def review_summary(rows) -> list[dict]:
    out = []
    for reviewer in sorted({r["reviewer"] for r in rows}):
        mine = [r for r in rows if r["reviewer"] == reviewer]
        decided = [r for r in mine if r["reviewer_diagnosis"] != "unsure"]
        reviewer_right = sum((r["reviewer_diagnosis"] == "melanoma") == (r["true_label"] == 1) for r in decided)
        model_right = sum((r["model_decision"] == "melanoma") == (r["true_label"] == 1) for r in mine)
        out.append({"reviewer": reviewer, "n": len(mine), "agree": accuracy(sum(r["agree"] for r in mine), len(mine)),
                    "reviewer_correct": accuracy(reviewer_right, len(decided)),
                    "model_correct": accuracy(model_right, len(mine))})
    return out


def csv_safe(value):
    """A text cell a spreadsheet would run as a formula (=, +, -, @, tab, CR first) gets a leading
    apostrophe; numbers stay numbers."""
    if isinstance(value, str) and value.startswith(CSV_FORMULA_PREFIXES):
        return "'" + value
    return value


def _csv_response(rows, filename: str) -> Response:
    buf = io.StringIO()
    writer = csv.writer(buf)
    if rows:
        writer.writerow(rows[0].keys())
        writer.writerows([tuple(csv_safe(v) for v in r) for r in rows])
    return Response(buf.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


def _data_uri(png: bytes | None) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode() if png else ""


def clean_metadata(fields: dict | None) -> dict:
    """Optional age/sex/site form fields as the manifest's columns; blank ones are left out (missing),
    an unreadable age is refused with a message rather than silently taken as missing."""
    out: dict = {}
    for key, column in (("age", "age"), ("sex", "sex"), ("site", "anatom_site")):
        value = str((fields or {}).get(key, "") or "").strip()
        if not value:
            continue
        if key == "age":
            try:
                age = float(value)
            except ValueError:
                raise UserError(422, f"Age {value[:20]!r} is not a number of years; leave it empty if "
                                     "unknown.") from None
            if not 0 <= age <= 120:
                raise UserError(422, f"Age {age:g} is outside 0-120; leave it empty if unknown.")
            out[column] = age
        else:
            out[column] = value[:40]
    return out


async def read_upload(request: Request, max_bytes: int, fields: dict | None = None) -> bytes:
    """The `file` part of a multipart upload, held in memory: Starlette's parser would spool parts over
    1 MB to a temporary file on disk; BodyLimit has already capped the whole body at `max_bytes`.
    `fields`: filled with the form's text fields (e.g. the optional age, sex, site)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UserError(415, "Send the image as multipart/form-data with a field named `file`.")
    parser = MultiPartParser(request.headers, request.stream(), max_files=1, max_fields=16)
    parser.spool_max_size = max_bytes + 1  # larger than any body BodyLimit lets through: never rolls over
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise UserError(400, f"Not a valid upload ({exc}).") from exc
    try:
        if fields is not None:
            fields.update({k: v for k, v in form.items() if isinstance(v, str)})
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise UserError(422, "No image in the upload: send it in a form field named `file`.")
        return await upload.read()
    finally:
        await form.close()


_UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary", "description": "a dermoscopic image"},
                   "age": {"type": "number", "description": "optional, for a model trained with --metadata"},
                   "sex": {"type": "string", "description": "optional: male or female"},
                   "site": {"type": "string", "description": "optional anatomical site, e.g. back, face"}}}}}}}


def create_app(cfg: ServeConfig) -> FastAPI:
    """Build the app (loads the model and opens the database once)."""
    state = ReviewApp(cfg)
    app = FastAPI(title="melanogan", version=__version__, docs_url="/api/docs", redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.state.review = state
    max_bytes = int(cfg.max_upload_mb * 1e6) + FORM_OVERHEAD

    def page(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
        return _TEMPLATES.TemplateResponse(request, name, {"version": __version__, "app": state, **context},
                                           status_code=status)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError):
        return _error_response(request.url.path, exc.status, exc.message)

    @app.exception_handler(MelanoganError)
    async def _melanogan_error(request: Request, exc: MelanoganError):
        return _error_response(request.url.path, 422, str(exc))

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request):
        return page(request, "index.html", run=cfg.run_dir.name)

    @app.get("/health")
    def health():
        return {"status": "ok", "version": __version__, "model": state.predictor.cfg.model,
                "threshold": state.threshold, "threshold_name": state.threshold_name,
                "turing": state.synthetic is not None, "review": state.real is not None}

    # predict ---------------------------------------------------------------------------------
    @app.get("/predict", response_class=HTMLResponse)
    def predict_form(request: Request):
        return page(request, "predict.html", result=None, max_mb=cfg.max_upload_mb)

    @app.post("/predict", response_class=HTMLResponse, openapi_extra=_UPLOAD_SCHEMA)
    async def predict_page(request: Request):
        fields: dict = {}
        data = await read_upload(request, max_bytes, fields)
        result = await run_in_threadpool(state.predict_upload, data, True, fields)
        return page(request, "predict.html", max_mb=cfg.max_upload_mb,
                    result={**result, "image": _data_uri(png_bytes(result["pixels"])),
                            "gradcam": _data_uri(result["gradcam_png"])})

    @app.post("/api/predict", openapi_extra=_UPLOAD_SCHEMA)
    async def predict_api(request: Request, gradcam: bool = Query(False)):
        """Probability, decision and threshold as JSON (`gradcam=true` adds the overlay as base64 PNG)."""
        fields: dict = {}
        data = await read_upload(request, max_bytes, fields)
        result = await run_in_threadpool(state.predict_upload, data, gradcam, fields)
        body = {k: result[k] for k in ("probability", "decision", "threshold", "threshold_name", "width", "height",
                                       "metadata")}
        if gradcam:
            body["gradcam_png_base64"] = base64.b64encode(result["gradcam_png"]).decode()
        return body

    # visual Turing test ----------------------------------------------------------------------
    @app.get("/turing", response_class=HTMLResponse)
    def turing_start(request: Request):
        return page(request, "turing_start.html", n_items=len(state.turing_items()))

    @app.get("/turing/next", response_class=HTMLResponse)
    def turing_next(request: Request, reviewer: str = Query("")):
        reviewer = clean_reviewer(reviewer)
        item, n_done = state.next_turing_item(reviewer)
        if item is None:
            return page(request, "done.html", reviewer=reviewer, n_done=n_done, task="turing")
        return page(request, "turing_item.html", reviewer=reviewer, public_id=state.store.public_id(
            reviewer, item["item_id"]), n_done=n_done, size=state.display_size)

    @app.post("/turing/answer")
    def turing_answer(reviewer: str = Form(""), item_id: str = Form(...), answer: str = Form(...),
                      confidence: int = Form(...)):
        reviewer = clean_reviewer(reviewer)
        if answer not in ("real", "synthetic"):
            raise UserError(422, f"answer must be 'real' or 'synthetic', not {answer[:20]!r}.")
        if not 1 <= confidence <= 5:
            raise UserError(422, f"confidence must be 1 to 5, not {confidence}.")
        item = state.item("turing", item_id, " Reload the Turing test page.", reviewer=reviewer)
        state.store.add_turing_answer(reviewer, item["item_id"], answer, confidence)  # a resubmit changes nothing
        return RedirectResponse(f"/turing/next?{_query(reviewer)}", status_code=303)

    @app.get("/turing/image/{item_id}")
    def turing_image(item_id: str):
        item = state.item("turing", item_id)
        pool = state.pool_of(item)
        return Response(pool.png(item["uid"], state.display_size or pool.cache_size), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/turing/results", response_class=HTMLResponse)
    def turing_results(request: Request, token: str = Query("")):
        state.check_token(token)
        return page(request, "turing_results.html", summary=turing_summary(state.store.turing_answers()), token=token)

    @app.get("/turing/results.csv")
    def turing_csv(token: str = Query("")):
        state.check_token(token)
        return _csv_response(state.store.turing_answers(), "turing_answers.csv")

    # prediction review -----------------------------------------------------------------------
    @app.get("/review", response_class=HTMLResponse)
    def review_start(request: Request):
        if state.real is None:
            raise UserError(404, "Prediction review is off: start the server with --real DATA_DIR.")
        return page(request, "review_start.html")

    @app.get("/review/next", response_class=HTMLResponse)
    def review_next(request: Request, reviewer: str = Query("")):
        reviewer = clean_reviewer(reviewer)
        item, n_done, n_total = state.next_review_item(reviewer)
        if item is None:
            return page(request, "done.html", reviewer=reviewer, n_done=n_done, task="review")
        probability, _ = state.review_score(item)
        return page(request, "review_item.html", reviewer=reviewer, item=item, n_done=n_done, n_total=n_total,
                    public_id=state.store.public_id(reviewer, item["item_id"]),
                    probability=probability, decision=state.decision(probability), diagnoses=DIAGNOSES)

    @app.get("/review/image/{item_id}")
    def review_image(item_id: str, gradcam: bool = Query(False)):
        item = state.item("review", item_id)
        pool = state.pool_of(item)
        png = state.review_score(item)[1] if gradcam else pool.png(item["uid"], pool.cache_size)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/review/answer")
    def review_answer(reviewer: str = Form(""), item_id: str = Form(...), agree: str = Form(...),
                      diagnosis: str = Form(...), comment: str = Form("")):
        reviewer = clean_reviewer(reviewer)
        if agree not in ("agree", "disagree"):
            raise UserError(422, "agree must be 'agree' or 'disagree'.")
        if diagnosis not in DIAGNOSES:
            raise UserError(422, f"diagnosis must be one of: {', '.join(DIAGNOSES)}.")
        if len(comment) > 1000:
            raise UserError(422, "A comment has at most 1,000 characters.")
        item = state.item("review", item_id, " Reload the review page.", reviewer=reviewer)
        probability, _ = state.review_score(item)  # the server's score, not one sent by the browser
        state.store.add_review_answer(reviewer, item["item_id"], probability, state.threshold,
                                      state.decision(probability), agree == "agree", diagnosis, comment.strip(),
                                      str(cfg.run_dir.resolve()))
        return RedirectResponse(f"/review/next?{_query(reviewer)}", status_code=303)

    @app.get("/review/results", response_class=HTMLResponse)
    def review_results(request: Request, token: str = Query("")):
        state.check_token(token)
        return page(request, "review_results.html", summary=review_summary(state.store.review_answers()), token=token)

    @app.get("/review/results.csv")
    def review_csv(token: str = Query("")):
        state.check_token(token)
        return _csv_response(state.store.review_answers(), "review_answers.csv")

    app.add_middleware(BodyLimit, max_bytes=max_bytes, limit_mb=cfg.max_upload_mb)
    app.add_middleware(SiteGuard, hosts=cfg.hosts())  # added last: runs first
    return app


def _query(reviewer: str) -> str:
    return urlencode({"reviewer": reviewer})
