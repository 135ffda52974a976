"""`melanogan bench serve`: how fast the model answers, from the command line and over HTTP.

1. `predict` throughput on a folder of JPEGs (decode + preprocessing + model, as a user runs it).
2. Latency of POST /api/predict (median, p95, max) while `concurrency` clients on localhost send
   `requests` uploads, stopping early at `max_seconds`; the server is `melanogan serve` in its own
   process, as deployed. Optionally the same for the Grad-CAM variant.
Without --run, a small model is trained on demo phantoms first (about a minute).
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _demo_run(tmp: Path) -> Path:
    from melanogan.classify.train import TrainConfig, train_classifier
    from melanogan.data.cache import CacheOptions
    from melanogan.data.demo import generate_demo_dataset
    from melanogan.data.manifest import prepare

    generate_demo_dataset(tmp / "raw", n_images=200, melanoma_rate=0.3, seed=0)
    prepare([("siim-isic-2020", tmp / "raw")], tmp / "data", CacheOptions(size=128), seed=0, workers=1)
    train_classifier(tmp / "data", tmp / "run", TrainConfig(model="small-cnn", image_size=128, epochs=2, workers=0),
                     progress=False)
    return tmp / "run"


def _images(tmp: Path, n: int, width: int, height: int) -> list[Path]:
    from melanogan.data.demo import generate_demo_dataset

    generate_demo_dataset(tmp / "images", n_images=n, melanoma_rate=0.2, seed=1, width=width, height=height)
    return sorted((tmp / "images" / "jpeg" / "train").glob("*.jpg"))


def load_test(url: str, payloads: list[bytes], requests: int, concurrency: int, max_seconds: float) -> dict:
    """`requests` uploads from `concurrency` threads (stopping at `max_seconds`): latency percentiles."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + max_seconds

    def worker() -> None:
        with httpx.Client(timeout=60) as client:
            while time.monotonic() < deadline:
                with lock:
                    k = next(counter, None)
                if k is None:
                    return
                t0 = time.perf_counter()
                try:
                    r = client.post(url, files={"file": ("image.jpg", payloads[k % len(payloads)], "image/jpeg")})
                    ok = r.status_code == 200
                except httpx.HTTPError as exc:
                    ok, r = False, exc
                dt = time.perf_counter() - t0
                with lock:
                    (latencies.append(dt) if ok else errors.append(str(getattr(r, "status_code", r))))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {"requests_ok": len(latencies), "errors": len(errors), "concurrency": concurrency,
            "seconds": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 2),
            "latency_ms_median": round(float(np.median(ms)), 1) if len(ms) else None,
            "latency_ms_p95": round(float(np.percentile(ms, 95)), 1) if len(ms) else None,
            "latency_ms_max": round(float(ms.max()), 1) if len(ms) else None}


def run(run_dir: Path | None = None, n_images: int = 200, width: int = 1024, height: int = 768,
        requests: int = 200, concurrency: int = 4, max_seconds: float = 60.0, gradcam: bool = True) -> dict:
    from melanogan.classify.predict import predict
    from melanogan.serve.process import start_server, stop_server

    with tempfile.TemporaryDirectory(prefix="melanogan-bench-serve-") as tmp:
        tmp = Path(tmp)
        run_dir = Path(run_dir) if run_dir else _demo_run(tmp)
        files = _images(tmp, n_images, width, height)
        results: dict = {"run": str(run_dir), "image_size_px": f"{width}x{height}",
                         "jpeg_kb_mean": round(statistics.mean(p.stat().st_size for p in files) / 1024, 1)}
        predict(run_dir, files[:8])  # warm-up (thresholds, lazy imports)
        t0 = time.perf_counter()
        table = predict(run_dir, files)
        seconds = time.perf_counter() - t0
        results["predict_folder"] = {"images": len(table), "seconds": round(seconds, 2),
                                     "images_per_s": round(len(table) / seconds, 1)}
        proc, base = start_server(["--run", str(run_dir), "--db", str(tmp / "bench.sqlite")], tmp / "server.log")
        try:
            payloads = [p.read_bytes() for p in files[:50]]
            url = f"{base}/api/predict"
            load_test(url, payloads, 8, 2, 30)  # warm-up
            results["api_predict"] = load_test(url, payloads, requests, concurrency, max_seconds)
            if gradcam:
                results["api_predict_gradcam"] = load_test(url + "?gradcam=true", payloads, requests, concurrency,
                                                           max_seconds)
        finally:
            stop_server(proc)
        return results
