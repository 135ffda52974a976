"""Prediction review: clinicians see the model's score and Grad-CAM on unseen test images and say
whether they agree; results for the organiser."""

from __future__ import annotations

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from melanogan.serve.routes import add_results_routes
from melanogan.serve.state import DIAGNOSES
from melanogan.serve.summaries import review_summary
from melanogan.serve.web import UserError, clean_reviewer, page, reviewer_query

router = APIRouter(prefix="/review")


@router.get("", response_class=HTMLResponse)
def review_start(request: Request):
    if request.app.state.review.real is None:
        raise UserError(404, "Prediction review is off: start the server with --real DATA_DIR.")
    return page(request, "review_start.html")


@router.get("/next", response_class=HTMLResponse)
def review_next(request: Request, reviewer: str = Query("")):
    state = request.app.state.review
    reviewer = clean_reviewer(reviewer)
    item, n_done, n_total = state.next_review_item(reviewer)
    if item is None:
        return page(request, "done.html", reviewer=reviewer, n_done=n_done, task="review")
    probability, _ = state.review_score(item)
    return page(request, "review_item.html", reviewer=reviewer, item=item, n_done=n_done, n_total=n_total,
                public_id=state.store.public_id(reviewer, item["item_id"]),
                probability=probability, decision=state.decision(probability), diagnoses=DIAGNOSES)


@router.get("/image/{item_id}")
def review_image(request: Request, item_id: str, gradcam: bool = Query(False)):
    state = request.app.state.review
    item = state.item("review", item_id)
    pool = state.pool_of(item)
    png = state.review_score(item)[1] if gradcam else pool.png(item["uid"], pool.cache_size)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.post("/answer")
def review_answer(request: Request, reviewer: str = Form(""), item_id: str = Form(...), agree: str = Form(...),
                  diagnosis: str = Form(...), comment: str = Form("")):
    state = request.app.state.review
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
                                  str(state.cfg.run_dir.resolve()))
    return RedirectResponse(f"/review/next?{reviewer_query(reviewer)}", status_code=303)


add_results_routes(router, "review", review_summary, lambda store: store.review_answers())
