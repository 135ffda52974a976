"""`melanogan bench travel`: does the default pipeline travel to a source it never saw?

Leave one source out over the three sources of ../shared/data (HAM10000, the ISIC 9-class set,
Derm7pt): train on two, split the third by patient/lesion into a part to choose on and a part to
report on (never overlapping), and report on the second part: ROC-AUC, and sensitivity/specificity
at the validation-chosen threshold (which does not travel) and at the threshold `calibrate` chose on
the first part. The same command takes `--model efficientnet_b0 --weights imagenet --image-size 256`
(the ISIC winners' recipe) for a user with a GPU and internet; we have not measured that here."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pandas as pd

from melanogan.classify import metrics as M

SOURCES = {"ham10000": ("ham10000", "ham10000_224"), "isic9": ("folder", "isic9_180"),
           "derm7pt": ("derm7pt", "derm7pt_384")}


def run(shared: Path = Path("../shared"), minutes: float = 8.0, holdout: tuple[str, ...] = tuple(SOURCES),
        model: str = "small-cnn", weights: str | None = None, image_size: int = 128, seed: int = 0,
        accelerator: str = "auto", resize_mode: str = "crop") -> dict:
    from melanogan.classify.train import TrainConfig
    from melanogan.data.cache import CacheOptions
    from melanogan.errors import MelanoganError

    data = Path(shared) / "data"
    missing = [folder for _, folder in SOURCES.values() if not (data / folder).is_dir()]
    if missing:
        raise MelanoganError(f"{data}: bench travel needs {', '.join(missing)} (../shared/data).")
    unknown = [h for h in holdout if h not in SOURCES]
    if unknown:
        raise MelanoganError(f"--holdout {unknown}: use {', '.join(SOURCES)}.")
    modes = [m for m in resize_mode.split(",") if m]
    for mode in modes:
        CacheOptions(resize_mode=mode)  # an unknown mode fails here, before any work
    rows = []
    with tempfile.TemporaryDirectory(prefix="melanogan-bench-travel-") as tmp:
        tmp = Path(tmp)
        for held in holdout:
            report_preds = {}
            for mode in modes:
                options = CacheOptions(size=max(256, image_size), resize_mode=mode)
                tag = f"{held}-{mode}"
                row, report_preds[mode] = _one(data, tmp, held, tag, options, TrainConfig(
                    model=model, weights=weights, image_size=image_size, epochs=200, max_minutes=minutes,
                    patience=1000, seed=seed), accelerator, seed)
                rows.append({**row, "resize_mode": mode})
                if mode != modes[0]:  # paired on the same report images: the lever's own effect
                    rows[-1]["vs_" + modes[0]] = _paired(report_preds[modes[0]], report_preds[mode])
    if len(modes) > 1:  # Holm over every held-out source and lever value compared
        compared = [r for r in rows if "vs_" + modes[0] in r]
        for r, p in zip(compared, M.holm([r["vs_" + modes[0]]["p_value"] for r in compared]), strict=True):
            r["vs_" + modes[0]]["p_holm"] = round(p, 4)
    return {"model": model, "weights": weights, "image_size": image_size, "resize_modes": modes,
            "minutes": minutes, "seed": seed,
            "protocol": "leave one source out; the held-out source split by patient/lesion into a part the "
                        "site threshold is chosen on and a disjoint part everything is reported on",
            "rows": rows}


def _one(data: Path, tmp: Path, held: str, tag: str, options, cfg, accelerator: str,
         seed: int) -> tuple[dict, pd.DataFrame]:
    """Train on the two other sources, report on half of `held`, choose the site threshold on the other half."""
    from melanogan.classify.calibrate import calibrate_site
    from melanogan.classify.evaluate import evaluate_run
    from melanogan.classify.train import train_classifier
    from melanogan.data.manifest import prepare
    from melanogan.data.splits import SplitFractions

    train_sources = [(kind, data / folder) for name, (kind, folder) in SOURCES.items() if name != held]
    prepare(train_sources, tmp / f"train-{tag}", options, seed=seed)
    kind, folder = SOURCES[held]
    # the held-out source: half to choose on (split "train"), half to report on ("test")
    prepare([(kind, data / folder)], tmp / f"site-{tag}", options, SplitFractions(0.5, 0.0, 0.5), seed=seed)
    t0 = time.perf_counter()
    summary = train_classifier(tmp / f"train-{tag}", tmp / f"run-{tag}", cfg, accelerator=accelerator, progress=False)
    train_minutes = (time.perf_counter() - t0) / 60
    internal = evaluate_run(tmp / f"run-{tag}", bootstrap=300)
    report = evaluate_run(tmp / f"run-{tag}", data_dir=tmp / f"site-{tag}", split="test", bootstrap=300)
    site = calibrate_site(tmp / f"run-{tag}", tmp / f"site-{tag}", "choose", split="train")
    preds = pd.read_csv(Path(report["out"]) / "predictions.csv")
    y, p = preds["label"].to_numpy(), M.sigmoid(preds["logit"].to_numpy() / site["temperature"])
    at_site = M.confusion_at(y, p, site["thresholds"]["val-youden"])
    travelled = report["thresholds"]["val_youden"]
    row = {
        "held_out": held, "trained_on": [n for n in SOURCES if n != held], "epochs": summary["epochs"],
        "train_minutes": round(train_minutes, 1), "internal_test_auc": round(internal["roc_auc"], 4),
        "report_images": report["n_images"], "report_melanoma": report["n_melanoma"],
        "excluded_overlap": report["excluded_overlap"], "external_auc": round(report["roc_auc"], 4),
        "external_auc_ci95": [round(x, 4) for x in report["roc_auc_ci95"]],
        "validation_threshold": {"sensitivity": travelled["sensitivity"], "specificity": travelled["specificity"]},
        "site_threshold": {"chosen_on_images": site["n_images"], "sensitivity": at_site["sensitivity"],
                           "specificity": at_site["specificity"]},
    }
    return row, preds


def _paired(first: pd.DataFrame, other: pd.DataFrame) -> dict:
    """AUC(other) - AUC(first) on the report images both runs scored, by a paired bootstrap over
    patient/lesion groups."""
    both = first[["uid", "label", "group", "logit"]].merge(other[["uid", "logit"]], on="uid", suffixes=("_a", "_b"))
    r = M.paired_bootstrap_auc_difference(both["label"], [both["logit_b"]], [both["logit_a"]], both["group"], n=1000)
    return {"images": len(both), "difference": round(r["difference"], 4),
            "ci95": [round(r["ci_low"], 4), round(r["ci_high"], 4)], "p_value": round(r["p_value"], 4)}
