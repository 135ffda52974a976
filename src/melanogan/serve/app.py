"""The FastAPI application behind `melanogan serve`.

Pages are rendered on the server (Jinja2, no front-end build). Uploaded bytes are parsed and decoded
in memory (the multipart parser never spools them to a file: the body limit caps their size) with the
same guarded decoder as `prepare` (size limit, decompression-bomb check), a few decodes at a time;
uploaded file names are never used. Images shown to reviewers are addressed by random ids that
differ per reviewer, so a page reveals neither a path nor whether an image is real or synthetic, and
reviewers cannot pool answers by id. Results and CSVs need the organiser's token; POSTs from other
sites and requests for unknown Host names are refused.

Where things are: serve/state.py (the model, pools and database, built by `build_state`),
serve/routes/ (one module per page: predict, turing, review, and the JSON api), serve/web.py (guards,
uploads, templates, CSV), serve/summaries.py (results).
"""

from __future__ import annotations

from fastapi import FastAPI, Request

from melanogan import __version__
from melanogan.errors import MelanoganError
from melanogan.serve.routes import api, predict, review, turing
from melanogan.serve.state import ServeConfig, build_state
from melanogan.serve.web import LOOPBACK_HOSTS, BodyLimit, SiteGuard, UserError, csv_safe, error_response

__all__ = ["LOOPBACK_HOSTS", "ServeConfig", "create_app", "csv_safe"]


def create_app(cfg: ServeConfig) -> FastAPI:
    """Build the app: the state once (model, database, pools), then the pages over it."""
    state = build_state(cfg)
    app = FastAPI(title="melanogan", version=__version__, docs_url="/api/docs", redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.state.review = state

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError):
        return error_response(request.url.path, exc.status, exc.message)

    @app.exception_handler(MelanoganError)
    async def _melanogan_error(request: Request, exc: MelanoganError):
        return error_response(request.url.path, 422, str(exc))

    for module in (predict, api, turing, review):
        app.include_router(module.router)
    app.add_middleware(BodyLimit, max_bytes=state.max_upload_bytes, limit_mb=cfg.max_upload_mb)
    app.add_middleware(SiteGuard, hosts=cfg.hosts())  # added last: runs first
    return app
