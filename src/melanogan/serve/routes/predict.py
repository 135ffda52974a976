"""The home page and the predict page: upload an image, see the probability, decision and Grad-CAM."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from melanogan.serve.pools import png_bytes
from melanogan.serve.web import UPLOAD_SCHEMA, data_uri, page, read_upload

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
def index(request: Request):
    return page(request, "index.html", run=request.app.state.review.cfg.run_dir.name)


@router.get("/predict", response_class=HTMLResponse)
def predict_form(request: Request):
    return page(request, "predict.html", result=None, max_mb=request.app.state.review.cfg.max_upload_mb)


@router.post("/predict", response_class=HTMLResponse, openapi_extra=UPLOAD_SCHEMA)
async def predict_page(request: Request):
    state = request.app.state.review
    fields: dict = {}
    data = await read_upload(request, state.max_upload_bytes, fields)
    result = await run_in_threadpool(state.predict_upload, data, True, fields)
    return page(request, "predict.html", max_mb=state.cfg.max_upload_mb,
                result={**result, "image": data_uri(png_bytes(result["pixels"])),
                        "gradcam": data_uri(result["gradcam_png"])})
