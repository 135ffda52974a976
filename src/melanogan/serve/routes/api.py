"""The JSON API: health and predict (for scripts; documented at /api/docs)."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from melanogan import __version__
from melanogan.serve.web import UPLOAD_SCHEMA, read_upload

router = APIRouter()


@router.get("/health")
def health(request: Request):
    state = request.app.state.review
    return {"status": "ok", "version": __version__, "model": state.predictor.cfg.model,
            "threshold": state.threshold, "threshold_name": state.threshold_name,
            "turing": state.synthetic is not None, "review": state.real is not None}


@router.post("/api/predict", openapi_extra=UPLOAD_SCHEMA)
async def predict_api(request: Request, gradcam: bool = Query(False)):
    """Probability, decision and threshold as JSON (`gradcam=true` adds the overlay as base64 PNG)."""
    state = request.app.state.review
    fields: dict = {}
    data = await read_upload(request, state.max_upload_bytes, fields)
    result = await run_in_threadpool(state.predict_upload, data, gradcam, fields)
    body = {k: result[k] for k in ("probability", "decision", "threshold", "threshold_name", "width", "height",
                                   "metadata")}
    if gradcam:
        body["gradcam_png_base64"] = base64.b64encode(result["gradcam_png"]).decode()
    return body
