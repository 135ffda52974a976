"""What every page of the web app shares: HTTP-level guards (host, origin, body size), the error page,
template rendering, upload parsing and input cleaning, CSV download. No model, no database."""

from __future__ import annotations

import base64
import csv
import io
import unicodedata
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.formparsers import MultiPartException, MultiPartParser

from melanogan import __version__

DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_PIXELS = 100_000_000  # a 10,000 x 10,000 image; larger headers are decompression bombs
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small form fields around an upload
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
CSV_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


class UserError(Exception):
    """A request we refuse, with the HTTP status and a message saying what to do."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


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
            response = error_response(scope["path"], 400, f"Unknown host {host[:80]!r}: this server answers to "
                                       f"{', '.join(sorted(self.hosts))} (see --allowed-host).")
            return await response(scope, receive, send)
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin") or headers.get("referer")
            if origin is not None and (origin == "null" or urlsplit(origin).netloc.lower() != host.lower()):
                response = error_response(scope["path"], 403, "Cross-site request refused: answers can only be "
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
        response = error_response(scope["path"], 413, f"The upload is larger than the server's limit of {limit}. "
                                                        "Send a smaller image (dermoscopic JPEGs are a few MB).")
        await response(scope, _empty_receive, send)


async def _empty_receive():
    return {"type": "http.disconnect"}


def error_response(path: str, status: int, message: str) -> Response:
    if path.startswith("/api/"):
        return JSONResponse({"detail": message}, status_code=status)
    body = TEMPLATES.get_template("error.html").render(status=status, message=message, version=__version__)
    return HTMLResponse(body, status_code=status)


def clean_reviewer(name: str | None) -> str:
    """A reviewer's name as stored: trimmed, 1-64 printable characters."""
    name = unicodedata.normalize("NFC", (name or "").strip())
    if not name:
        raise UserError(422, "Enter your name (it identifies your answers).")
    if len(name) > 64 or any(unicodedata.category(c).startswith("C") for c in name):
        raise UserError(422, "A reviewer name has at most 64 printable characters.")
    return name


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


UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary", "description": "a dermoscopic image"},
                   "age": {"type": "number", "description": "optional, for a model trained with --metadata"},
                   "sex": {"type": "string", "description": "optional: male or female"},
                   "site": {"type": "string", "description": "optional anatomical site, e.g. back, face"}}}}}}}




def page(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
    """A server-rendered page; templates see the version and the application state as `app`."""
    return TEMPLATES.TemplateResponse(request, name, {"version": __version__, "app": request.app.state.review,
                                                      **context}, status_code=status)


def csv_safe(value):
    """A text cell a spreadsheet would run as a formula (=, +, -, @, tab, CR first) gets a leading
    apostrophe; numbers stay numbers."""
    if isinstance(value, str) and value.startswith(CSV_FORMULA_PREFIXES):
        return "'" + value
    return value


def csv_response(rows, filename: str) -> Response:
    buf = io.StringIO()
    writer = csv.writer(buf)
    if rows:
        writer.writerow(rows[0].keys())
        writer.writerows([tuple(csv_safe(v) for v in r) for r in rows])
    return Response(buf.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


def data_uri(png: bytes | None) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode() if png else ""




def reviewer_query(reviewer: str) -> str:
    return urlencode({"reviewer": reviewer})
