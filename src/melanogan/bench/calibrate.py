"""`melanogan bench calibrate`: how many labelled local cases does a new site need?

Trains the default classifier on HAM10000 for a time budget, scores Derm7pt (another clinic and
dermoscope, never trained on) with it, shows what the validation-chosen threshold gives there, and
resamples site samples of several sizes to measure the operating point's uncertainty after
`melanogan calibrate` (`sample_size_curve`)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pandas as pd

from melanogan.classify import metrics as M


def run(shared: Path = Path("../shared"), minutes: float = 10.0, sizes: tuple[int, ...] = (25, 50, 100, 200, 400),
        repeats: int = 200) -> dict:
    from melanogan.classify.calibrate import sample_size_curve
    from melanogan.classify.evaluate import evaluate_run
    from melanogan.classify.train import TrainConfig, train_classifier
    from melanogan.data.manifest import prepare
    from melanogan.errors import MelanoganError

    data = Path(shared) / "data"
    if not (data / "ham10000_224").is_dir() or not (data / "derm7pt_384").is_dir():
        raise MelanoganError(f"{data}: bench calibrate needs ham10000_224/ and derm7pt_384/ (../shared/data).")
    with tempfile.TemporaryDirectory(prefix="melanogan-bench-calibrate-") as tmp:
        tmp = Path(tmp)
        prepare([("ham10000", data / "ham10000_224")], tmp / "ham", seed=0)  # the defaults throughout
        prepare([("derm7pt", data / "derm7pt_384")], tmp / "site", seed=0)
        t0 = time.perf_counter()
        summary = train_classifier(tmp / "ham", tmp / "run", TrainConfig(epochs=200, max_minutes=minutes,
                                                                         patience=1000), progress=False)
        train_minutes = (time.perf_counter() - t0) / 60
        internal = evaluate_run(tmp / "run", bootstrap=500)
        site = evaluate_run(tmp / "run", data_dir=tmp / "site", bootstrap=500)
        preds = pd.read_csv(Path(site["out"]) / "predictions.csv")
    y, p = preds["label"].to_numpy(), M.sigmoid(preds["logit"].to_numpy())
    travelled = site["thresholds"]["val_youden"]
    return {"train_minutes": round(train_minutes, 1), "epochs": summary["epochs"],
            "ham10000_test_auc": round(internal["roc_auc"], 4), "ham10000_test_auc_ci95": internal["roc_auc_ci95"],
            "derm7pt_images": site["n_images"], "derm7pt_melanoma": site["n_melanoma"],
            "derm7pt_auc": round(site["roc_auc"], 4), "derm7pt_auc_ci95": site["roc_auc_ci95"],
            "validation_youden_at_derm7pt": {k: travelled[k] for k in ("threshold", "sensitivity", "specificity")},
            "site_sample_sizes": sample_size_curve(y, p, preds["group"].to_numpy(), list(sizes), repeats)}
