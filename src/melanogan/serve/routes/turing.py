"""The visual Turing test: real or synthetic? Answers per reviewer; results for the organiser."""

from __future__ import annotations

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from melanogan.serve.routes import add_results_routes
from melanogan.serve.summaries import turing_summary
from melanogan.serve.web import UserError, clean_reviewer, page, reviewer_query

router = APIRouter(prefix="/turing")


@router.get("", response_class=HTMLResponse)
def turing_start(request: Request):
    return page(request, "turing_start.html", n_items=len(request.app.state.review.turing_items()))


@router.get("/next", response_class=HTMLResponse)
def turing_next(request: Request, reviewer: str = Query("")):
    state = request.app.state.review
    reviewer = clean_reviewer(reviewer)
    item, n_done = state.next_turing_item(reviewer)
    if item is None:
        return page(request, "done.html", reviewer=reviewer, n_done=n_done, task="turing")
    return page(request, "turing_item.html", reviewer=reviewer, public_id=state.store.public_id(
        reviewer, item["item_id"]), n_done=n_done, size=state.display_size)


@router.post("/answer")
def turing_answer(request: Request, reviewer: str = Form(""), item_id: str = Form(...), answer: str = Form(...),
                  confidence: int = Form(...)):
    state = request.app.state.review
    reviewer = clean_reviewer(reviewer)
    if answer not in ("real", "synthetic"):
        raise UserError(422, f"answer must be 'real' or 'synthetic', not {answer[:20]!r}.")
    if not 1 <= confidence <= 5:
        raise UserError(422, f"confidence must be 1 to 5, not {confidence}.")
    item = state.item("turing", item_id, " Reload the Turing test page.", reviewer=reviewer)
    state.store.add_turing_answer(reviewer, item["item_id"], answer, confidence)  # a resubmit changes nothing
    return RedirectResponse(f"/turing/next?{reviewer_query(reviewer)}", status_code=303)


@router.get("/image/{item_id}")
def turing_image(request: Request, item_id: str):
    state = request.app.state.review
    item = state.item("turing", item_id)
    pool = state.pool_of(item)
    return Response(pool.png(item["uid"], state.display_size or pool.cache_size), media_type="image/png",
                    headers={"Cache-Control": "private, max-age=3600"})


add_results_routes(router, "turing", turing_summary, lambda store: store.turing_answers())
