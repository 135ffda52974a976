"""The web app's pages, one module each (predict, turing, review) plus the JSON API; every route reads
the shared state from `request.app.state.review` (serve/state.py)."""
