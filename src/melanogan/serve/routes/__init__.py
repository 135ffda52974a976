"""The web app's pages, one module each (predict, turing, review) plus the JSON API; every route reads
the shared state from `request.app.state.review` (serve/state.py)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from melanogan.serve.web import csv_response, page


def add_results_routes(router: APIRouter, task: str, summarize: Callable, answers: Callable) -> None:
    """The organiser's results page and CSV of a task (`turing` or `review`), behind the admin token."""

    @router.get("/results", response_class=HTMLResponse)
    def results(request: Request, token: str = Query("")):
        state = request.app.state.review
        state.check_token(token)
        return page(request, f"{task}_results.html", summary=summarize(answers(state.store)), token=token)

    @router.get("/results.csv")
    def results_csv(request: Request, token: str = Query("")):
        state = request.app.state.review
        state.check_token(token)
        return csv_response(answers(state.store), f"{task}_answers.csv")
