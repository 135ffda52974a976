"""Every route of the web app through FastAPI's test client, with the bad inputs the issue names."""

from __future__ import annotations

import csv
import io
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from melanogan.classify.predict import predict
from melanogan.serve.app import ServeConfig, create_app
from tests.conftest import png_with_header_size

TOKEN = "organiser-token"
LOCAL = "http://127.0.0.1:8000"  # what a browser on this machine sends as Host/Origin


def _client(serve_inputs, db, **options) -> TestClient:
    run, real, syn = serve_inputs
    options = {"admin_token": TOKEN, **options}
    return TestClient(create_app(ServeConfig(run_dir=run, db=db, synthetic_dir=syn, real_dir=real, **options)),
                      base_url=LOCAL)


def _internal(client, public_id: str):
    """The item behind a reviewer's public id (what only the server knows)."""
    store = client.app.state.review.store
    return store.item(store.resolve_public(public_id)["item_id"])


@pytest.fixture(scope="module")
def client(serve_inputs, tmp_path_factory):
    return _client(serve_inputs, tmp_path_factory.mktemp("db") / "review.sqlite", max_upload_mb=0.5)


def _jpeg(demo_raw) -> tuple[str, bytes]:
    path = sorted((demo_raw / "jpeg" / "train").glob("*.jpg"))[0]
    return str(path), path.read_bytes()


def _item_id(page: str) -> str:
    return re.search(r'name="item_id" value="([^"]+)"', page).group(1)


def test_home_health_and_docs(client):
    assert client.get("/health").json()["status"] == "ok"
    home = client.get("/")
    assert home.status_code == 200 and "Visual Turing test" in home.text and "small-cnn" in home.text
    assert client.get("/api/openapi.json").status_code == 200 and client.get("/api/docs").status_code == 200


def test_predict_page_and_api_match_the_command_line(client, serve_inputs, demo_raw):
    path, data = _jpeg(demo_raw)
    expected = predict(serve_inputs[0], [path])["probability"].iloc[0]
    api = client.post("/api/predict", files={"file": ("lesion.jpg", data, "image/jpeg")}).json()
    assert api["probability"] == pytest.approx(expected, abs=1e-6)  # same preprocessing as `melanogan predict`
    assert api["decision"] == ("melanoma" if api["probability"] >= api["threshold"] else "not melanoma")
    assert client.get("/predict").status_code == 200
    page = client.post("/predict", files={"file": ("../../etc/passwd", data, "image/jpeg")})
    assert page.status_code == 200 and f"{expected:.3f}" in page.text
    cam = re.search(r'id="gradcam" src="data:image/png;base64,([^"]+)"', page.text)
    assert cam is not None and "passwd" not in page.text  # a user's file name is never used
    with_cam = client.post("/api/predict?gradcam=true", files={"file": ("x.jpg", data)}).json()
    import base64

    overlay = Image.open(io.BytesIO(base64.b64decode(with_cam["gradcam_png_base64"])))
    assert overlay.size[0] == overlay.size[1] > 0


@pytest.mark.parametrize(("name", "payload", "status"), [
    ("text.jpg", b"this is not an image", 415),
    ("empty.jpg", b"", 400),
    ("truncated.jpg", None, 422),
    ("bomb.png", png_with_header_size(100_000, 100_000), 413),
    ("huge.bin", b"\xff" * 700_000, 413),
])
def test_bad_uploads_get_4xx_and_the_server_keeps_serving(client, demo_raw, name, payload, status):
    if payload is None:
        payload = _jpeg(demo_raw)[1][:300]
    for route in ("/api/predict", "/predict"):
        r = client.post(route, files={"file": (name, payload, "application/octet-stream")})
        assert r.status_code == status, r.text
        assert ("detail" in r.json()) if route.startswith("/api") else ("Error" in r.text)
    assert client.get("/health").status_code == 200
    assert client.post("/api/predict", files={"file": ("ok.jpg", _jpeg(demo_raw)[1])}).status_code == 200


def test_upload_limit_holds_without_a_content_length(client):
    def chunks():  # a chunked request: the size is only known while reading
        for _ in range(20):
            yield b"x" * 50_000

    r = client.post("/api/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413


def test_a_real_decompression_bomb_is_refused(serve_inputs, tmp_path):
    client = _client(serve_inputs, tmp_path / "r.sqlite", max_pixels=1_000_000)
    buf = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buf, format="PNG")  # 4 Mpx of zeros: a few KB of PNG
    assert len(buf.getvalue()) < 50_000
    r = client.post("/api/predict", files={"file": ("b.png", buf.getvalue())})
    assert r.status_code == 413 and "decompression-bomb" in r.json()["detail"]


def test_turing_test_is_blinded_balanced_and_scored(client, serve_inputs):
    start = client.get("/turing")
    assert start.status_code == 200 and "48 dermoscopic images" in start.text  # 12 per class, real and synthetic
    assert client.get("/turing/next", params={"reviewer": ""}).status_code == 422
    assert client.get("/turing/next", params={"reviewer": "x" * 65}).status_code == 422
    seen_pools, sizes, truth = set(), set(), {}
    for k in range(48):
        page = client.get("/turing/next", params={"reviewer": "Ann"})
        item_id = _item_id(page.text)
        assert "synthetic:" not in page.text and "/tmp" not in page.text  # nothing reveals the source
        png = client.get(f"/turing/image/{item_id}")
        assert png.headers["content-type"] == "image/png"
        sizes.add(Image.open(io.BytesIO(png.content)).size)
        pool = _internal(client, item_id)["pool"]
        seen_pools.add(pool)
        answer = "synthetic" if k % 3 else "real"  # a reviewer who guesses
        truth[item_id] = answer == pool
        r = client.post("/turing/answer", data={"reviewer": "Ann", "item_id": item_id, "answer": answer,
                                                "confidence": 2}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/turing/next?reviewer=Ann"
    assert seen_pools == {"real", "synthetic"}
    assert sizes == {(32, 32)}  # real images shown at the generator's resolution, like synthetic ones
    done = client.get("/turing/next", params={"reviewer": "Ann"})
    assert 'id="done"' in done.text and "48" in done.text and "/results" not in done.text
    assert client.get("/turing/results").status_code == 403  # the truth is for the organiser only
    assert client.get("/turing/results.csv", params={"token": "guess"}).status_code == 403
    results = client.get("/turing/results", params={"token": TOKEN}).text
    n_correct = sum(truth.values())
    assert f"{100 * n_correct / 48:.1f}%" in results and "Ann" in results and "synthetic images" in results
    rows = list(csv.DictReader(io.StringIO(client.get("/turing/results.csv", params={"token": TOKEN}).text)))
    ann = [r for r in rows if r["reviewer"] == "Ann"]
    assert len(ann) == 48 and sum(int(r["correct"]) for r in ann) == n_correct
    assert {r["truth"] for r in ann} == {"real", "synthetic"} and {r["label"] for r in ann} == {"0", "1"}


def test_turing_answers_are_validated(client):
    item_id = _item_id(client.get("/turing/next", params={"reviewer": "Val"}).text)
    base = {"reviewer": "Val", "item_id": item_id, "answer": "real", "confidence": 3}
    assert client.post("/turing/answer", data={**base, "answer": "maybe"}).status_code == 422
    assert client.post("/turing/answer", data={**base, "confidence": 7}).status_code == 422
    assert client.post("/turing/answer", data={**base, "confidence": "high"}).status_code == 422
    assert client.post("/turing/answer", data={**base, "item_id": "../../etc/passwd"}).status_code == 404
    assert client.get("/turing/image/../../etc/passwd").status_code == 404
    assert client.get("/turing/image/nope").status_code == 404
    ok = client.post("/turing/answer", data=base, follow_redirects=False)
    again = client.post("/turing/answer", data={**base, "answer": "synthetic"}, follow_redirects=False)
    assert ok.status_code == again.status_code == 303
    mine = [r for r in client.app.state.review.store.turing_answers() if r["reviewer"] == "Val"]
    assert [(r["answer"], r["confidence"]) for r in mine] == [("real", 3)]  # a resubmission changes nothing


def test_prediction_review(client, serve_inputs):
    assert client.get("/review").status_code == 200
    page = client.get("/review/next", params={"reviewer": "Dr B"})
    item_id = _item_id(page.text)
    shown = float(re.search(r'id="probability">([0-9.]+)<', page.text).group(1))
    for suffix in ("", "?gradcam=true"):
        png = client.get(f"/review/image/{item_id}{suffix}")
        assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (64, 64)
    base = {"reviewer": "Dr B", "item_id": item_id, "agree": "disagree", "diagnosis": "melanoma", "comment": "atypical"}
    assert client.post("/review/answer", data={**base, "diagnosis": "bad"}).status_code == 422
    assert client.post("/review/answer", data={**base, "agree": "perhaps"}).status_code == 422
    assert client.post("/review/answer", data={**base, "comment": "x" * 1001}).status_code == 422
    r = client.post("/review/answer", data=base, follow_redirects=False)
    assert r.status_code == 303
    assert client.get("/review/results.csv").status_code == 403
    rows = list(csv.DictReader(io.StringIO(client.get("/review/results.csv", params={"token": TOKEN}).text)))
    (mine,) = [x for x in rows if x["reviewer"] == "Dr B"]
    assert mine["reviewer_diagnosis"] == "melanoma" and mine["agree"] == "0" and mine["comment"] == "atypical"
    assert float(mine["probability"]) == pytest.approx(shown, abs=5e-4)  # the server's score, as shown
    assert mine["true_label"] in ("0", "1")
    assert "Dr B" in client.get("/review/results", params={"token": TOKEN}).text
    assert client.get("/review/image/unknown").status_code == 404


def test_answers_survive_a_restart(serve_inputs, tmp_path):
    db = tmp_path / "r.sqlite"
    first = _client(serve_inputs, db)
    item_id = _item_id(first.get("/turing/next", params={"reviewer": "Cy"}).text)
    first.post("/turing/answer", data={"reviewer": "Cy", "item_id": item_id, "answer": "real", "confidence": 5})
    ids = {i["item_id"] for i in first.app.state.review.store.items("turing")}
    second = _client(serve_inputs, db)  # a new process would build exactly this
    assert {i["item_id"] for i in second.app.state.review.store.items("turing")} == ids
    assert "Cy" in second.get("/turing/results", params={"token": TOKEN}).text
    for _ in range(10):  # an answered image is not shown again
        assert _item_id(second.get("/turing/next", params={"reviewer": "Cy"}).text) != item_id


def test_without_synthetic_images_the_turing_test_explains_how_to_turn_it_on(serve_inputs, tmp_path):
    run, real, _ = serve_inputs
    client = TestClient(create_app(ServeConfig(run_dir=run, db=tmp_path / "r.sqlite", real_dir=real)), base_url=LOCAL)
    r = client.get("/turing/next", params={"reviewer": "Ann"})
    assert r.status_code == 404 and "--synthetic" in r.text
    assert client.get("/review/next", params={"reviewer": "Ann"}).status_code == 200  # review still works


def test_concurrent_predictions_are_consistent(client, demo_raw):
    from concurrent.futures import ThreadPoolExecutor

    data = _jpeg(demo_raw)[1]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: client.post("/api/predict?gradcam=true", files={"file": ("a.jpg", data)}),
                                range(8)))
    probabilities = {round(r.json()["probability"], 9) for r in results}
    assert all(r.status_code == 200 for r in results) and len(probabilities) == 1
    assert np.isfinite(next(iter(probabilities)))


def test_reviewers_see_their_own_ids_and_no_results_links(client):
    store = client.app.state.review.store
    internal = store.items("turing")[0]["item_id"]
    a, b = store.public_id("Ann", internal), store.public_id("Bo", internal)
    assert a != b and store.public_id("Ann", internal) == a  # stable per reviewer, different between reviewers
    # Bo cannot answer with (or learn from) Ann's id
    r = client.post("/turing/answer", data={"reviewer": "Bo", "item_id": a, "answer": "real", "confidence": 3})
    assert r.status_code == 404
    assert not [x for x in store.turing_answers() if x["reviewer"] == "Bo"]
    for page in (client.get("/").text, client.get("/turing").text,
                 client.get("/turing/next", params={"reviewer": "Ann"}).text):
        assert "/results" not in page and TOKEN not in page


def test_cross_site_posts_and_unknown_hosts_are_refused(client, demo_raw):
    item_id = _item_id(client.get("/turing/next", params={"reviewer": "Xs"}).text)
    answer = {"reviewer": "Xs", "item_id": item_id, "answer": "real", "confidence": 3}
    for header in ({"origin": "http://evil.example"}, {"referer": "http://evil.example/page"},
                   {"origin": "http://127.0.0.1:9999"}, {"origin": "null"}):
        r = client.post("/turing/answer", data=answer, headers=header, follow_redirects=False)
        assert r.status_code == 403, header
    assert not [x for x in client.app.state.review.store.turing_answers() if x["reviewer"] == "Xs"]
    upload = {"file": ("a.jpg", _jpeg(demo_raw)[1])}
    assert client.post("/api/predict", files=upload, headers={"origin": "http://evil.example"}).status_code == 403
    assert client.get("/health", headers={"host": "evil.example"}).status_code == 400  # DNS rebinding
    ok = client.post("/turing/answer", data=answer, headers={"origin": LOCAL}, follow_redirects=False)
    assert ok.status_code == 303  # the server's own page
    assert client.post("/api/predict", files=upload).status_code == 200  # scripts send no Origin


def test_csv_cells_cannot_become_spreadsheet_formulas(client):
    from melanogan.serve.app import csv_safe

    assert [csv_safe(v) for v in ("=1+1", "+x", "-2", "@A1", "\tx", "Ann", 0.25, -3)] == \
        ["'=1+1", "'+x", "'-2", "'@A1", "'\tx", "Ann", 0.25, -3]
    name = '=HYPERLINK("http://evil.example","x")'
    item_id = _item_id(client.get("/turing/next", params={"reviewer": name}).text)
    client.post("/turing/answer", data={"reviewer": name, "item_id": item_id, "answer": "real", "confidence": 1})
    text = client.get("/turing/results.csv", params={"token": TOKEN}).text
    (row,) = [r for r in csv.DictReader(io.StringIO(text)) if "HYPERLINK" in r["reviewer"]]
    assert row["reviewer"] == "'" + name


def test_uploads_stay_in_memory_and_decodes_are_bounded(serve_inputs, tmp_path, monkeypatch):
    import tempfile
    import threading
    import time

    import melanogan.serve.state as app_mod

    client = _client(serve_inputs, tmp_path / "r.sqlite", max_upload_mb=5)
    noise = np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG", quality=95)
    assert len(buf.getvalue()) > 1_500_000  # over Starlette's 1 MB spooling size

    def no_disk(self):
        raise AssertionError("an upload was spooled to a file on disk")

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", no_disk)
    r = client.post("/api/predict", files={"file": ("big.jpg", buf.getvalue())})
    assert r.status_code == 200 and r.json()["width"] == 1200

    state, running, peak = client.app.state.review, [0], [0]
    lock, real_decode = threading.Lock(), app_mod.decode_image

    def slow_decode(*args, **kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        try:
            return real_decode(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(app_mod, "decode_image", slow_decode)
    small = io.BytesIO()
    Image.fromarray(noise[:64, :64]).save(small, format="PNG")
    threads = [threading.Thread(target=state.predict_upload, args=(small.getvalue(), False)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == app_mod.DECODE_SLOTS  # decodes overlap, but never more than the slots


def test_a_calibrated_site_sets_the_servers_threshold_and_probabilities(serve_inputs, tmp_path, demo_raw):
    from melanogan.classify import metrics as M
    from melanogan.classify.calibrate import calibrate_site

    run, real, _ = serve_inputs
    r = calibrate_site(run, real, "home")  # all of it: only the wiring is tested here
    client = _client(serve_inputs, tmp_path / "r.sqlite", site="home")
    health = client.get("/health").json()
    assert health["threshold"] == pytest.approx(r["thresholds"]["val-youden"])
    assert health["threshold_name"] == "site:home:youden"
    path, data = _jpeg(demo_raw)
    logit = predict(run, [path])["logit"].iloc[0]
    api = client.post("/api/predict", files={"file": ("a.jpg", data)}).json()
    assert api["probability"] == pytest.approx(float(M.sigmoid(logit / r["temperature"])), abs=1e-6)
