"""`melanogan bench calibrate`: how many labelled local cases does a new site need?

Trains the default classifier on HAM10000 for a time budget, scores Derm7pt (another clinic and
dermoscope, never trained on) with it, shows what the validation-chosen threshold gives there, and
resamples site samples of several sizes to measure the operating point's uncertainty after
`melanogan calibrate` (`sample_size_curve`). It also measures how many of the site's images
`calibrate --adapt-batchnorm` needs: Derm7pt split by lesion into a pool to adapt on and a part to
report on, the model adapted on n images drawn from the pool (`adaptation_curve`); and how many
labelled ones `calibrate --refit-head` needs: the head refitted on n labelled images of the pool,
the report part scored with it (`head_curve`)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pandas as pd

from melanogan.classify import metrics as M

ADAPT_SIZES = (16, 32, 64, 128, 256)
HEAD_SIZES = (100, 200, 300, 400)


def head_curve(f_pool, y_pool, g_pool, f_report, y_report, w0, b0: float, sizes: tuple[int, ...] = HEAD_SIZES,
               repeats: int = 5, seed: int = 0) -> list[dict]:
    """ROC-AUC on the report part (features `f_report`, labels `y_report`) of a head refitted as
    `calibrate --refit-head` refits it (classify/site_head.py) on n labelled images drawn from the pool
    (whole groups, `repeats` draws per n; once with all of the pool, listed last). A draw with fewer
    than the 20 melanomas or 20 others `calibrate` asks for is not fitted (counted as skipped)."""
    import numpy as np

    from melanogan.classify.calibrate import draw_groups
    from melanogan.classify.site_head import MIN_PER_CLASS, json_lambda, refit_head

    y_pool, g_pool = np.asarray(y_pool), np.asarray(g_pool)
    rng = np.random.default_rng(seed)
    rows = []
    for n in [n for n in sizes if n < len(y_pool)] + [len(y_pool)]:
        aucs, lambdas, skipped = [], [], 0
        for _ in range(repeats if n < len(y_pool) else 1):
            take = draw_groups(rng, g_pool, n)
            if min(y_pool[take].sum(), (1 - y_pool[take]).sum()) < MIN_PER_CLASS:
                skipped += 1
                continue
            fit = refit_head(f_pool[take], y_pool[take], g_pool[take], w0, b0, seed=seed)
            aucs.append(M.roc_auc(y_report, f_report @ fit["weight"] + fit["bias"]))
            lambdas.append(json_lambda(fit["lambda"]))
        if aucs:
            rows.append({"n": n, "draws": len(aucs), "skipped": skipped, "auc_median": round(float(np.median(aucs)), 4),
                         "auc_min": round(float(np.min(aucs)), 4), "auc_max": round(float(np.max(aucs)), 4),
                         "lambdas": lambdas})
    return rows


def adaptation_curve(model, pool, report, y_report, sizes: tuple[int, ...] = ADAPT_SIZES, repeats: int = 5,
                     seed: int = 0) -> list[dict]:
    """ROC-AUC on `report` (a dataset of (image, label) items, labels `y_report`) after adapting the
    model's batch normalisation on n images drawn from `pool`, `repeats` draws per n (one for all of
    the pool, listed last), each from the model's own statistics; the model keeps them afterwards."""
    import numpy as np
    import torch
    from torch.utils.data import Subset

    from melanogan.classify.adapt import (
        adapt_batchnorm,
        batchnorm_statistics,
        dataset_batches,
        even_batch_size,
        load_statistics,
    )
    from melanogan.classify.train import predict_logits

    own = batchnorm_statistics(model)
    rng = np.random.default_rng(seed)
    rows = []
    try:
        for n in [n for n in sizes if n < len(pool)] + [len(pool)]:
            aucs = []
            for _ in range(repeats if n < len(pool) else 1):
                load_statistics(model, own, "the model's own statistics")
                take = np.sort(rng.choice(len(pool), n, replace=False))
                adapt_batchnorm(model, dataset_batches(Subset(pool, take.tolist()), None, torch.device("cpu"),
                                                       even_batch_size(n)))
                aucs.append(M.roc_auc(y_report, predict_logits(model, report)))
            rows.append({"n": n, "draws": len(aucs), "auc_median": round(float(np.median(aucs)), 4),
                         "auc_min": round(float(np.min(aucs)), 4), "auc_max": round(float(np.max(aucs)), 4)})
    finally:
        load_statistics(model, own, "the model's own statistics")
    return rows


def run(shared: Path = Path("../shared"), minutes: float = 10.0, sizes: tuple[int, ...] = (25, 50, 100, 200, 400),
        repeats: int = 200) -> dict:
    from melanogan.classify.calibrate import sample_size_curve
    from melanogan.classify.evaluate import evaluate_run, run_cache_options, split_dataset
    from melanogan.classify.train import TrainConfig, load_model, predict_logits, train_classifier
    from melanogan.data.manifest import cache_for, prepare
    from melanogan.data.splits import SplitFractions
    from melanogan.errors import MelanoganError

    data = Path(shared) / "data"
    if not (data / "ham10000_224").is_dir() or not (data / "derm7pt_384").is_dir():
        raise MelanoganError(f"{data}: bench calibrate needs ham10000_224/ and derm7pt_384/ (../shared/data).")
    with tempfile.TemporaryDirectory(prefix="melanogan-bench-calibrate-") as tmp:
        tmp = Path(tmp)
        prepare([("ham10000", data / "ham10000_224")], tmp / "ham", seed=0)  # the defaults throughout
        # split by lesion: "train" is the pool adaptation draws from, "test" the part it is reported on
        prepare([("derm7pt", data / "derm7pt_384")], tmp / "site", fractions=SplitFractions(0.5, 0.0, 0.5), seed=0)
        t0 = time.perf_counter()
        summary = train_classifier(tmp / "ham", tmp / "run", TrainConfig(epochs=200, max_minutes=minutes,
                                                                         patience=1000), progress=False)
        train_minutes = (time.perf_counter() - t0) / 60
        internal = evaluate_run(tmp / "run", bootstrap=500)
        site = evaluate_run(tmp / "run", data_dir=tmp / "site", bootstrap=500)
        preds = pd.read_csv(Path(site["out"]) / "predictions.csv")
        model, cfg, _ = load_model(tmp / "run" / "best")
        cache = cache_for(tmp / "site", run_cache_options(tmp / "run"))
        pool, _ = split_dataset(cfg, tmp / "site", ["train"], cache=cache)
        report, _ = split_dataset(cfg, tmp / "site", ["test"], cache=cache)
        y_report = report.rows["label"].to_numpy().astype(int)
        adaptation = {"pool_images": len(pool), "report_images": len(report), "report_melanoma": int(y_report.sum()),
                      "unadapted_auc": round(M.roc_auc(y_report, predict_logits(model, report)), 4),
                      "adapted": adaptation_curve(model, pool, report, y_report)}
        # the head refitted on n labelled pool images (the model's own batch normalisation again)
        import torch

        from melanogan.classify.site_head import captured_head_inputs, head_layer

        features = {}
        for part, ds in (("pool", pool), ("report", report)):
            with captured_head_inputs(model) as seen:
                predict_logits(model, ds)
            features[part] = torch.cat(seen).double().numpy()
        rows = pool.rows
        layer = head_layer(model)
        w0, b0 = layer.weight.detach().double().numpy().reshape(-1), float(layer.bias.detach())
        head = {"pool_images": len(pool), "pool_melanoma": int(rows["label"].sum()),
                "trained_head_auc": round(M.roc_auc(y_report, features["report"] @ w0 + b0), 4),
                "refitted": head_curve(features["pool"], rows["label"].to_numpy().astype(int),
                                       (rows["source"].astype(str) + ":" + rows["cluster_id"].astype(str)).to_numpy(),
                                       features["report"], y_report, w0, b0)}
    y, p = preds["label"].to_numpy(), M.sigmoid(preds["logit"].to_numpy())
    travelled = site["thresholds"]["val_youden"]
    return {"train_minutes": round(train_minutes, 1), "epochs": summary["epochs"],
            "ham10000_test_auc": round(internal["roc_auc"], 4), "ham10000_test_auc_ci95": internal["roc_auc_ci95"],
            "derm7pt_images": site["n_images"], "derm7pt_melanoma": site["n_melanoma"],
            "derm7pt_auc": round(site["roc_auc"], 4), "derm7pt_auc_ci95": site["roc_auc_ci95"],
            "validation_youden_at_derm7pt": {k: travelled[k] for k in ("threshold", "sensitivity", "specificity")},
            "site_sample_sizes": sample_size_curve(y, p, preds["group"].to_numpy(), list(sizes), repeats),
            "adapt_batchnorm": adaptation, "refit_head": head}
