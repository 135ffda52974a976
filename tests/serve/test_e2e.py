"""End to end in a real browser: Debian's headless Chromium driven by Playwright (no browser download)
against `melanogan serve` running as its own process; then a restart on the same database."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from melanogan.serve.process import start_server, stop_server

CHROMIUM = os.environ.get("MELANOGAN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a sandboxed CI machine with no network: no background connections, no GPU, no sandbox as root.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install "
                                         "-e '.[dev]')")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium (apt-get install chromium) or set "
                    "MELANOGAN_CHROMIUM")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def _serve(run: Path, real: Path, syn: Path, db: Path, log: Path):
    return start_server(["--run", str(run), "--real", str(real), "--synthetic", str(syn), "--db", str(db),
                         "--admin-token", TOKEN], log)


TOKEN = "e2e-organiser"


def test_upload_predict_turing_results_and_restart(browser, serve_inputs, demo_raw, tmp_path):
    run, real, syn = serve_inputs
    db = tmp_path / "review.sqlite"
    server, url = _serve(run, real, syn, db, tmp_path / "server.log")
    page = browser.new_page()
    try:
        # Predict: upload an image, see probability, decision and a rendered Grad-CAM overlay.
        page.goto(url + "/predict")
        image = sorted((demo_raw / "jpeg" / "train").glob("*.jpg"))[0]
        page.set_input_files("#file", str(image))
        page.click("#predict")
        page.wait_for_selector("#result")
        probability = float(page.inner_text("#probability"))
        assert 0.0 <= probability <= 1.0
        assert page.inner_text("#decision") in ("melanoma", "not melanoma")
        assert page.eval_on_selector("#gradcam", "img => img.complete && img.naturalWidth > 0")

        # Turing test: ten answers, each on a rendered image.
        page.goto(url + "/turing")
        page.fill("#reviewer", "Dr Playwright")
        page.click("#start")
        for k in range(10):
            page.wait_for_selector("#turing-image")
            page.wait_for_function("document.querySelector('#turing-image').naturalWidth > 0")
            assert page.inner_text("#n-done") == str(k)
            page.check(f"input[name=confidence][value='{1 + k % 5}']")
            page.click("#answer-real" if k % 2 else "#answer-synthetic")
        page.wait_for_selector("#turing-image")
        assert page.inner_text("#n-done") == "10"

        assert page.locator("a[href*='results']").count() == 0  # reviewers are never pointed at the truth
        page.goto(url + "/turing/results")
        assert "organiser" in page.inner_text("body")  # 403 without the token
        page.goto(url + f"/turing/results?token={TOKEN}")
        row = page.locator(".reviewer[data-reviewer='Dr Playwright'] tr[data-group='all images']")
        assert row.locator(".n").inner_text() == "10"
    finally:
        page.close()
        stop_server(server)

    # Restart on the same database: the answers are still there, and counted.
    server, url = _serve(run, real, syn, db, tmp_path / "server.log")
    page = browser.new_page()
    try:
        page.goto(url + f"/turing/results?token={TOKEN}")
        row = page.locator(".reviewer[data-reviewer='Dr Playwright'] tr[data-group='all images']")
        assert row.locator(".n").inner_text() == "10"
        page.goto(url + "/turing/next?reviewer=Dr%20Playwright")
        assert page.inner_text("#n-done") == "10"
    finally:
        page.close()
        stop_server(server)
