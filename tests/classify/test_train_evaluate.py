"""Classifier training and evaluation: learning on real images, determinism, resume, safety."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from melanogan.classify import metrics as M
from melanogan.classify.evaluate import evaluate_run
from melanogan.classify.train import (
    TrainConfig,
    _lr_at,
    _progress,
    balanced_indices,
    check_synthetic_manifest,
    diagnosis_classes,
    diagnosis_loss,
    load_model,
    not_used_on_resume,
    train_classifier,
)
from melanogan.data.cache import CacheOptions
from melanogan.data.manifest import prepare
from melanogan.errors import MelanoganError
from melanogan.fileio import write_parquet

TINY = {"model": "small-cnn", "image_size": 32, "epochs": 2, "batch_size": 8, "workers": 0, "patience": 5}


@pytest.fixture(scope="module")
def real_subset(shared_data, tmp_path_factory):
    """Melanoma vs nevus from the real ISIC 9-class folders (symlinked, never copied), prepared at 64px."""
    root = tmp_path_factory.mktemp("isic_subset")
    for cls, n in (("melanoma", 300), ("nevus", 300)):
        (root / "src" / cls).mkdir(parents=True)
        for f in sorted((shared_data / "isic9_180" / "Train" / cls).glob("*.jpg"))[:n]:
            os.symlink(f, root / "src" / cls / f.name)
    prepare([("folder", root / "src")], root / "data", CacheOptions(size=64), seed=0, workers=2)
    return root / "data"


def test_training_on_real_images_beats_chance_on_held_out_images(real_subset, tmp_path):
    cfg = TrainConfig(model="small-cnn", image_size=64, epochs=6, batch_size=32, workers=0, lr=3e-3, augment="classic")
    summary = train_classifier(real_subset, tmp_path / "run", cfg, progress=False)
    result = evaluate_run(tmp_path / "run", bootstrap=200)
    assert summary["best_val_auc"] > 0.6
    assert result["roc_auc"] > 0.6, result["roc_auc"]
    assert result["n_images"] > 50


def test_deterministic_and_resumable(demo_prepared, tmp_path):
    cfg = TrainConfig(**{**TINY, "epochs": 3})
    train_classifier(demo_prepared, tmp_path / "a", cfg, progress=True)
    paused = train_classifier(demo_prepared, tmp_path / "b", cfg, progress=False, stop_after_epochs=2)
    assert paused["stopped_by"] == "paused" and paused["epochs"] == 2
    train_classifier(demo_prepared, tmp_path / "b", cfg, resume=True, progress=False)
    a = load_file(tmp_path / "a" / "last" / "model.safetensors")
    b = load_file(tmp_path / "b" / "last" / "model.safetensors")
    assert all(np.allclose(a[k].float().numpy(), b[k].float().numpy(), atol=1e-6) for k in a)
    sa = [json.loads(x)["val_auc"] for x in (tmp_path / "a" / "stats.jsonl").read_text().splitlines()]
    sb = [json.loads(x)["val_auc"] for x in (tmp_path / "b" / "stats.jsonl").read_text().splitlines()]
    assert sa == pytest.approx(sb)
    # options given with --resume that differ from the run's own are named, not silently dropped
    again = train_classifier(demo_prepared, tmp_path / "c", cfg, progress=False, stop_after_epochs=1)
    assert not [n for n in again["notes"] if "resumed" in n]
    other = TrainConfig(**{**TINY, "epochs": 3, "lr": 5e-3, "augment": "strong"})
    resumed = train_classifier(demo_prepared, tmp_path / "c", other, resume=True, progress=False)
    assert [n for n in resumed["notes"] if n.startswith("resumed")] == [
        "resumed with the run's own settings (last/state.json); these options differ from them and were not used: "
        "lr 0.005 (the run's: 0.002); augment 'strong' (the run's: 'classic'). Train a new run (another --out) "
        "to change them."]
    assert yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())["lr"] == 2e-3
    same = not_used_on_resume(TrainConfig(**TINY), TrainConfig(**{**TINY, "precision": "bf16-mixed",
                                                                    "diagnosis_weight": 0.5}))
    assert same is None  # what a run resolved at its start (auto precision, the recommended head) is no request


def test_evaluation_uses_validation_thresholds_and_writes_everything(demo_prepared, tmp_path):
    from melanogan.classify.predict import run_thresholds

    train_classifier(demo_prepared, tmp_path / "run", TrainConfig(**TINY), progress=False)
    r = evaluate_run(tmp_path / "run", bootstrap=100)
    out = tmp_path / "run" / "eval-test"
    for name in ("metrics.json", "predictions.csv", "roc.png", "pr.png", "scores.png", "reliability.png"):
        assert (out / name).is_file(), name
    preds = pd.read_csv(out / "predictions.csv")
    assert set(preds["split"]) == {"test"} and len(preds) == r["n_images"]
    # the diagnosis table covers every evaluated image once, each share read at the Youden threshold
    from melanogan.data.manifest import load_manifest
    dx = preds.join(load_manifest(demo_prepared).set_index("uid")["diagnosis"], on="uid")
    table = pd.read_csv(out / "diagnoses.csv")
    assert table["n_images"].sum() == len(preds) and set(table["diagnosis"]) == set(dx["diagnosis"])
    youden = r["thresholds"]["val_youden"]["threshold"]
    for row in r["by_diagnosis"]:
        part = dx[(dx["diagnosis"] == row["diagnosis"]) & (dx["label"] == int(row["melanoma"]))]
        assert row["called_melanoma"] == pytest.approx((part["probability"] >= youden).mean())
    assert r["roc_auc"] == pytest.approx(M.roc_auc(preds["label"], preds["logit"]))
    # The thresholds are the ones validation predictions give, applied unchanged to the test images.
    evaluate_run(tmp_path / "run", split="val", bootstrap=10)
    val = pd.read_csv(tmp_path / "run" / "eval-val" / "predictions.csv")
    yv, pv = val["label"].to_numpy(), M.sigmoid(val["logit"].to_numpy())
    y, p = preds["label"].to_numpy(), M.sigmoid(preds["logit"].to_numpy())
    for name, expected in (("val_youden", M.threshold_youden(yv, pv)),
                           ("val_sens95", M.threshold_for_sensitivity(yv, pv, 0.95)), ("fixed_0.5", 0.5)):
        got = r["thresholds"][name]
        assert got["threshold"] == pytest.approx(expected)
        assert (got["sensitivity"], got["specificity"]) == pytest.approx(
            (M.confusion_at(y, p, expected)["sensitivity"], M.confusion_at(y, p, expected)["specificity"]), nan_ok=True)
    # `predict`/`serve`/`export` use the same values (same fp32 scores of the same checkpoint)
    stored = run_thresholds(tmp_path / "run")
    assert stored["val-youden"] == pytest.approx(M.threshold_youden(yv, pv), abs=1e-7)
    assert stored["val-sens95"] == pytest.approx(M.threshold_for_sensitivity(yv, pv, 0.95), abs=1e-7)
    saved = json.loads((out / "metrics.json").read_text())
    # oracle operating points (read off the test ROC) are named so and kept apart from the thresholds
    assert not {k for k in saved if "_at_sens" in k or "_at_spec" in k}
    oracle = saved["oracle_operating_points"]
    assert "oracle" in oracle["note"]
    assert oracle["specificity_at_sensitivity_95"] == pytest.approx(M.specificity_at_sensitivity(y, p, 0.95))
    assert not any("oracle" in k or "_at_" in k for k in saved["thresholds"])
    # subgroups: every image in exactly one value of each variable, at the validation threshold
    groups = pd.read_csv(out / "subgroups.csv")
    for variable, part in groups.groupby("variable"):
        assert part["n_images"].sum() == r["n_images"], variable
    assert {"source", "sex", "age_band", "ita_category"} <= set(groups["variable"])
    assert (out / "subgroups.png").is_file()


def test_stored_thresholds_follow_the_checkpoint(demo_prepared, tmp_path):
    """A `best/` replaced after thresholds were stored (e.g. by --resume) gets its own thresholds."""
    from melanogan.classify.predict import checkpoint_sha256, run_thresholds
    from melanogan.fileio import read_json, write_json

    train_classifier(demo_prepared, tmp_path / "run", TrainConfig(**TINY), progress=False)
    best = tmp_path / "run" / "best"
    first = run_thresholds(tmp_path / "run")
    stale = {"val-youden": 0.123, "val-sens95": 0.0456, "checkpoint_sha256": "0" * 64}
    write_json(best / "thresholds.json", stale)  # thresholds of another checkpoint
    notes = []
    again = run_thresholds(tmp_path / "run", log=notes.append)
    assert again == pytest.approx(first) and again["val-youden"] != 0.123
    assert notes and "another checkpoint" in notes[0]
    assert read_json(best / "thresholds.json")["checkpoint_sha256"] == checkpoint_sha256(best)


def test_synthetic_rows_cannot_reach_val_or_test(demo_prepared, tmp_path):
    from melanogan.data.manifest import load_manifest

    syn = tmp_path / "syn"
    syn.mkdir()
    m = load_manifest(demo_prepared).head(4).assign(source="synthetic", split=["train", "train", "val", "test"])
    write_parquet(syn / "manifest.parquet", m)
    with pytest.raises(MelanoganError, match="claim split test, val"):
        check_synthetic_manifest(syn)
    cfg = TrainConfig(**{**TINY, "synthetic": [str(syn)]})
    with pytest.raises(MelanoganError, match="only be used for training"):
        train_classifier(demo_prepared, tmp_path / "run", cfg, progress=False)


def test_clear_errors(demo_prepared, tmp_path):
    with pytest.raises(MelanoganError, match="nothing to resume"):
        train_classifier(demo_prepared, tmp_path / "x", TrainConfig(**TINY), resume=True, progress=False)
    with pytest.raises(MelanoganError, match="no trained classifier"):
        evaluate_run(tmp_path / "x")
    with pytest.raises(MelanoganError, match="unknown model"):
        train_classifier(demo_prepared, tmp_path / "y", TrainConfig(**{**TINY, "model": "resnet9000"}), progress=False)


def test_schedule_warms_up_then_anneals_and_follows_the_clock_under_a_time_budget():
    cfg = TrainConfig(lr=1.0, warmup_fraction=0.1)
    assert _lr_at(0.05, cfg) == pytest.approx(0.5)  # half-way through warm-up
    assert _lr_at(0.1, cfg) == pytest.approx(1.0)
    assert _lr_at(0.55, cfg) == pytest.approx(0.5)  # cosine mid-point
    assert _lr_at(1.0, cfg) == pytest.approx(0.0, abs=1e-12)
    inf = float("inf")
    assert _progress(49, 100, elapsed=1e6, budget=inf) == pytest.approx(0.5)  # no budget: steps only
    assert _progress(9, 100, elapsed=30, budget=60) == pytest.approx(0.5)  # the clock runs out first
    assert _progress(79, 100, elapsed=30, budget=60) == pytest.approx(0.8)  # the epochs run out first


def test_a_multi_source_test_split_is_also_reported_per_source(demo_raw, tmp_path):
    from PIL import Image

    from melanogan.data.demo import render_phantom

    rng = np.random.default_rng(5)
    for k in range(40):  # a second source: class folders of other phantoms
        cls = "melanoma" if k % 4 == 0 else "nevus"
        (tmp_path / "folder" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_phantom(rng, cls == "melanoma", 96, 80)).save(tmp_path / "folder" / cls / f"{k}.jpg")
    prepare([("siim-isic-2020", demo_raw), ("folder", tmp_path / "folder")], tmp_path / "data", CacheOptions(size=32),
            seed=0)
    train_classifier(tmp_path / "data", tmp_path / "run", TrainConfig(**TINY), progress=False)
    from typer.testing import CliRunner

    from melanogan.cli import app

    shown = CliRunner().invoke(app, ["evaluate", str(tmp_path / "run"), "--bootstrap", "50"])
    assert shown.exit_code == 0, shown.output
    r = json.loads((tmp_path / "run" / "eval-test" / "metrics.json").read_text())
    preds = pd.read_csv(tmp_path / "run" / "eval-test" / "predictions.csv")
    assert set(r["by_source"]) == set(preds["source"]) == {"siim-isic-2020", "folder"}
    for source in r["by_source"]:
        assert f"source {source}: " in shown.output
    for source, m in r["by_source"].items():
        part = preds[preds["source"] == source]
        assert m["n_images"] == len(part) and m["n_melanoma"] == int(part["label"].sum())
        if 0 < part["label"].sum() < len(part):
            assert m["roc_auc"] == pytest.approx(M.roc_auc(part["label"], part["logit"]))
        else:
            assert m["roc_auc"] is None and m["roc_auc_ci95"] == [None, None]  # NaN is null in metrics.json


def test_evaluate_prints_the_benign_diagnoses_hardest_to_tell_from_melanoma(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from melanogan import api
    from melanogan.cli import app

    def dx(name, n, auc, called, melanoma=False):
        return {"diagnosis": name, "melanoma": melanoma, "n_images": n, "called_melanoma": called,
                "roc_auc_vs_melanoma": auc, "roc_auc_vs_melanoma_ci95": None if auc is None else [0.1, 0.9]}

    metrics = {"split": "test", "n_images": 300, "n_melanoma": 40, "roc_auc": 0.8, "roc_auc_ci95": [0.7, 0.9],
               "pr_auc": 0.5, "thresholds": {}, "by_subgroup": [], "out": str(tmp_path),
               "by_diagnosis": [dx("melanoma", 40, None, 0.9, True), dx("nevus", 200, 0.93, 0.1),
                                dx("seborrheic keratosis", 30, 0.61, 0.45), dx("dermatofibroma", 3, None, 0.0),
                                dx("basal cell carcinoma", 20, 0.7, 0.3), dx("solar lentigo", 7, 0.85, 0.14)]}
    monkeypatch.setattr(api, "evaluate", lambda *a, **k: SimpleNamespace(metrics=metrics))
    shown = CliRunner().invoke(app, ["evaluate", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    # lowest AUC first, three of them, the one without an AUC left out
    assert ("hardest against melanoma: seborrheic keratosis (30): ROC-AUC 0.610, 45% called melanoma; "
            "basal cell carcinoma (20): ROC-AUC 0.700, 30% called melanoma; solar lentigo (7): ROC-AUC 0.850, "
            "14% called melanoma;") in " ".join(shown.output.split())


def test_balanced_sampling_halves_the_classes_and_splits_one_draw_across_ranks():
    import torch
    from torch.utils.data import WeightedRandomSampler

    labels = np.array([1] * 50 + [0] * 950)
    one = balanced_indices(labels, torch.Generator().manual_seed(3))
    assert abs(labels[one].mean() - 0.5) < 0.06 and len(one) == len(labels)
    w = np.where(labels == 1, 0.5 / 50, 0.5 / 950)
    reference = list(WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), len(labels), replacement=True,
                                           generator=torch.Generator().manual_seed(3)))
    assert one == reference  # same order as before: single-process runs are unchanged
    shares = [balanced_indices(labels, torch.Generator().manual_seed(3), r, 2) for r in (0, 1)]
    assert shares[0] != shares[1] and sorted(shares[0] + shares[1]) == sorted(one)


def test_auc_summary_exact_on_tiny_parts_and_nan_for_one_class():
    from melanogan.classify.evaluate import auc_summary

    both = pd.DataFrame({"label": [0, 1, 0, 1], "logit": [0.1, 0.9, 0.35, 0.3], "group": list("abcd")})
    s = auc_summary(both, 1.0, 200, 0)
    assert (s["n_images"], s["n_melanoma"], s["roc_auc"]) == (4, 2, 0.75)
    # The CI resamples groups: ten copies of each image in its own group change neither the AUC nor
    # the CI, while the same 40 images as 40 groups give a narrower one.
    copies = pd.concat([both] * 10, ignore_index=True)
    grouped = auc_summary(copies, 1.0, 200, 0)
    assert grouped["roc_auc"] == 0.75 and grouped["roc_auc_ci95"] == s["roc_auc_ci95"]
    by_image = auc_summary(copies.assign(group=[str(i) for i in range(40)]), 1.0, 200, 0)
    lo, hi = s["roc_auc_ci95"]
    assert by_image["roc_auc_ci95"][1] - by_image["roc_auc_ci95"][0] < hi - lo
    one = pd.DataFrame({"label": [1, 1], "logit": [0.1, 0.9], "group": ["a", "b"]})
    s = auc_summary(one, 1.0, 200, 0)
    assert s["n_melanoma"] == 2 and np.isnan(s["roc_auc"]) and np.isnan(s["roc_auc_ci95"]).all()


def test_diagnosis_loss_exact_and_zero_without_known_diagnoses():
    import math

    import torch

    logits = torch.zeros(3, 4, requires_grad=True)  # uniform over 4 classes: cross-entropy log 4 per row
    loss = diagnosis_loss(logits, torch.tensor([-100, 2, 0]))
    assert loss.item() == pytest.approx(math.log(4))
    none_known = diagnosis_loss(logits, torch.tensor([-100, -100, -100]))
    none_known.backward()
    assert none_known.item() == 0.0 and torch.equal(logits.grad, torch.zeros(3, 4))


def test_diagnosis_head_is_on_by_default_where_the_data_has_diagnoses():
    from melanogan.classify.train import RECOMMENDED_DIAGNOSIS_WEIGHT, resolve_diagnosis_head

    rows = pd.DataFrame({"source": ["ham10000"] * 3, "diagnosis": ["mel", "nv", "unknown"]})
    cfg, notes = resolve_diagnosis_head(TrainConfig(), rows, "DATA")
    assert cfg.diagnosis_weight == RECOMMENDED_DIAGNOSIS_WEIGHT == 0.5
    assert cfg.diagnosis_classes == ["ham10000:mel", "ham10000:nv"] and "on" in notes[0]
    cfg, notes = resolve_diagnosis_head(TrainConfig(), rows.assign(diagnosis="unknown"), "DATA")
    assert cfg.diagnosis_weight == 0.0 and cfg.diagnosis_classes == [] and "off" in notes[0]
    cfg, notes = resolve_diagnosis_head(TrainConfig(diagnosis_weight=0), rows, "DATA")
    assert cfg.diagnosis_weight == 0.0 and cfg.diagnosis_classes == [] and notes == []
    with pytest.raises(MelanoganError, match="at least 2 known diagnoses"):
        resolve_diagnosis_head(TrainConfig(diagnosis_weight=0.3), rows.assign(diagnosis="unknown"), "DATA")


def test_diagnosis_classes_are_per_source_and_skip_unknown():
    rows = pd.DataFrame({"source": ["ham10000", "ham10000", "folder", "folder", "siim-isic-2020"],
                         "diagnosis": ["mel", "nv", "nevus", "Unknown", "unknown"]})
    assert diagnosis_classes(rows) == ["folder:nevus", "ham10000:mel", "ham10000:nv"]
    # a missing diagnosis is unknown too, not a class (pandas 3 keeps None missing through astype(str))
    rows.loc[3, "diagnosis"] = None
    assert diagnosis_classes(rows) == ["folder:nevus", "ham10000:mel", "ham10000:nv"]


def test_shared_diagnosis_vocabulary_merges_sources_and_drops_other():
    from melanogan.classify.train import WithDiagnosis, resolve_diagnosis_head

    rows = pd.DataFrame({"source": ["ham10000", "derm7pt", "derm7pt", "folder", "derm7pt", "folder", "ham10000"],
                         "diagnosis": ["nv", "clark nevus", "melanosis", "Nevus", "melanoma (in situ)", "unknown",
                                       "mel"]})
    # per source: seven rows, six classes (only the unknown is dropped); no two sources share one
    assert diagnosis_classes(rows) == ["derm7pt:clark nevus", "derm7pt:melanoma (in situ)", "derm7pt:melanosis",
                                       "folder:Nevus", "ham10000:mel", "ham10000:nv"]
    # shared: the three naevi are one class, the two melanomas another; "melanosis" (group other) is none
    assert diagnosis_classes(rows, "shared") == ["melanoma", "nevus"]

    class Rows:  # WithDiagnosis reads only the rows (and length) of its dataset here
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

    codes = WithDiagnosis(Rows(rows), ["melanoma", "nevus"], vocabulary="shared").codes
    assert codes.tolist() == [1, 1, -100, 1, 0, -100, 0]
    source_classes = diagnosis_classes(rows)
    codes = WithDiagnosis(Rows(rows), source_classes).codes
    assert codes.tolist() == [5, 0, 2, 3, 1, -100, 4]
    # synthetic images' diagnoses ("synthetic-melanoma") are no class under either vocabulary: the
    # head learns real lesions only
    synthetic = pd.DataFrame({"source": ["synthetic"] * 2, "diagnosis": ["synthetic-melanoma", "synthetic-other"]})
    assert WithDiagnosis(Rows(synthetic), ["melanoma", "nevus"], vocabulary="shared").codes.tolist() == [-100, -100]
    assert WithDiagnosis(Rows(synthetic), source_classes).codes.tolist() == [-100, -100]
    cfg, notes = resolve_diagnosis_head(TrainConfig(diagnosis_vocabulary="shared"), rows, "DATA")
    assert cfg.diagnosis_classes == ["melanoma", "nevus"] and "shared vocabulary" in notes[0]
    # the option names the head's classes: with the head off it would change nothing, so it is refused
    with pytest.raises(ValueError, match="turns the head off"):
        TrainConfig(diagnosis_vocabulary="shared", diagnosis_weight=0)
    # a run recorded before the option rebuilds with the classes it was trained with
    old = TrainConfig.model_validate({"diagnosis_weight": 0.5, "diagnosis_classes": source_classes})
    assert old.diagnosis_vocabulary == "source"


def test_training_with_a_diagnosis_head_records_its_classes_and_rebuilds(demo_prepared, tmp_path):
    cfg = TrainConfig(**{**TINY, "diagnosis_weight": 0.5})
    train_classifier(demo_prepared, tmp_path / "run", cfg, progress=False)
    model, saved, _ = load_model(tmp_path / "run" / "best")
    assert saved.diagnosis_classes == ["siim-isic-2020:melanoma", "siim-isic-2020:nevus"]  # "unknown" is no class
    assert model.diagnosis_head.out_features == 2
    assert "diagnosis_head.weight" in load_file(tmp_path / "run" / "best" / "model.safetensors")
    assert evaluate_run(tmp_path / "run", bootstrap=20)["n_images"] > 0
    from melanogan.classify.export import export_model

    for fmt in ("onnx", "torchscript"):  # the exported model is the melanoma logit alone
        assert export_model(tmp_path / "run", fmt, tmp_path / f"m.{fmt}")["max_abs_difference_vs_pytorch"] <= 1e-4
    # a manifest without known diagnoses: a clear error, before any training
    m = pd.read_parquet(demo_prepared / "manifest.parquet")
    data = tmp_path / "nodx"
    data.mkdir()
    for item in demo_prepared.iterdir():
        if item.name != "manifest.parquet":
            os.symlink(item, data / item.name)
    write_parquet(data / "manifest.parquet", m.assign(diagnosis="unknown"))
    with pytest.raises(MelanoganError, match="at least 2 known diagnoses"):
        train_classifier(data, tmp_path / "run2", cfg, progress=False)


def test_external_data_is_scored_with_the_runs_preprocessing(demo_raw, tmp_path):
    from PIL import Image

    from melanogan.classify.predict import Predictor
    from melanogan.data.demo import render_phantom
    from melanogan.data.manifest import load_manifest

    prepare([("siim-isic-2020", demo_raw)], tmp_path / "own", CacheOptions(size=32), seed=0)
    train_classifier(tmp_path / "own", tmp_path / "run", TrainConfig(**TINY), progress=False)
    rng = np.random.default_rng(11)
    externals = []
    for parent in ("a", "b"):  # two external sets in folders of the same name
        for k in range(16):
            cls = "melanoma" if k % 4 == 0 else "nevus"
            (tmp_path / parent / "src" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(render_phantom(rng, cls == "melanoma", 96, 80)).save(
                tmp_path / parent / "src" / cls / f"{k}.jpg")
        # prepared otherwise than the run's data: other size, no colour constancy
        prepare([("folder", tmp_path / parent / "src")], tmp_path / parent / "ext",
                CacheOptions(size=48, color_constancy=False), seed=0)
        externals.append(tmp_path / parent / "ext")
    notes: list[str] = []
    r = evaluate_run(tmp_path / "run", data_dir=externals[0], bootstrap=20, log=notes.append)
    assert r["split"] == "all" and r["external"]  # an external set is tested whole by default
    assert len(notes) == 1 and "the model's preprocessing" in notes[0]  # said on the console, once
    run_options = json.loads((tmp_path / "run" / "run.json").read_text())["cache_options"]
    assert r["preprocessing"] == run_options
    assert (externals[0] / "cache" / CacheOptions(**run_options).name / "pixels.npy").is_file()
    # the scores are those of the run's own preprocessing of each external file (as `predict` does it)
    preds = pd.read_csv(Path(r["out"]) / "predictions.csv")
    manifest = load_manifest(externals[0]).set_index("uid")
    predictor = Predictor(tmp_path / "run")
    expected = predictor.logits(torch.stack([predictor.preprocess_file(manifest.loc[u, "path"])[1]
                                             for u in preds["uid"]]))
    assert np.allclose(preds["logit"], expected, atol=1e-4)
    assert len(preds) == int(manifest["label"].isin([0, 1]).sum()) - r["excluded_overlap"]
    notes.clear()
    r2 = evaluate_run(tmp_path / "run", data_dir=externals[0], bootstrap=20, log=notes.append)
    assert notes == [] and r2["roc_auc"] == r["roc_auc"]  # the matching cache is reused
    r3 = evaluate_run(tmp_path / "run", data_dir=externals[1], bootstrap=20, log=notes.append)
    assert r3["out"] != r["out"] and Path(r["out"]).name.startswith("eval-external-ext-")


class _KeysOnSharpness(torch.nn.Module):
    """Melanoma logit = minus the image's high-frequency energy: blur looks like melanoma."""

    def forward(self, x):
        lap = x[..., 1:-1, 1:-1] * 4 - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
        return 2.0 - 4.0 * lap.abs().mean(dim=(1, 2, 3))


class _KeysOnBrightness(torch.nn.Module):
    """Melanoma logit = darkness: resampling keeps the mean, so no shortcut."""

    def forward(self, x):
        return -x.mean(dim=(1, 2, 3))


def test_the_shortcut_probe_flags_a_model_that_keys_on_blur(demo_prepared):
    from melanogan.classify.evaluate import probe_summary, shortcut_probe

    blur = shortcut_probe(_KeysOnSharpness(), 64, demo_prepared, resolution=16)
    assert blur["warning"] and blur["rise"] > 0.01 and blur["mean_after"] > blur["mean_before"]
    assert blur["n_images"] == int(((pd.read_parquet(demo_prepared / "manifest.parquet")["split"] == "val")
                                    & (pd.read_parquet(demo_prepared / "manifest.parquet")["label"] == 0)).sum())
    plain = shortcut_probe(_KeysOnBrightness(), 64, demo_prepared, resolution=16)
    assert not plain["warning"] and abs(plain["rise"]) < 0.01
    exact = probe_summary(np.zeros(4), np.log([1 / 3] * 4))  # 0.5 -> 0.25: a fall is never a warning
    assert exact["rise"] == pytest.approx(-0.25) and not exact["warning"]


def test_generator_resolution_reaches_real_training_rows_only(demo_prepared):
    from melanogan.classify.train import build_datasets
    from melanogan.data.transforms import GeneratorResolution, eval_preset

    for batch_augment in (True, False):  # uint8 to the batch augmentation, or through per-image presets
        after = (lambda x: x) if batch_augment else eval_preset(64)
        base = {**TINY, "augment": "none", "image_size": 64, "batch_augment": batch_augment}
        train, val, _ = build_datasets(demo_prepared, TrainConfig(**base, generator_resolution=16))
        real = train.datasets[0].dataset
        raw = real.raw(0)
        path = GeneratorResolution(16)(raw)
        assert not torch.equal(path, raw)  # the path changes a 64 px image
        assert torch.equal(real[0][0], after(path))  # training row: through the path
        assert torch.equal(val[0][0], eval_preset(64)(val.raw(0)))  # validation row: never
        plain, _, _ = build_datasets(demo_prepared, TrainConfig(**base))
        assert torch.equal(plain.datasets[0].dataset[0][0], after(raw))


def test_subgroup_table_exact_and_small_subgroups_listed_not_dropped():
    from melanogan.classify.evaluate import age_band, subgroup_table

    assert [age_band(a) for a in (None, float("nan"), 12, 30, 59.5, 74, 75, 90)] == \
        ["unknown", "unknown", "<30", "30-44", "45-59", "60-74", ">=75", ">=75"]
    # men: 5 melanomas all above 5 others (AUC 1); women: 2 melanomas; unknown sex: melanomas only
    logits = [2.0, 3.0, 4.0, 5.0, 6.0, -2.0, -3.0, -4.0, -5.0, 0.5] + [1.0, -1.0] + [-1.0] * 6 + [3.0, 3.0]
    labels = [1] * 5 + [0] * 5 + [1, 1] + [0] * 6 + [1, 1]
    sex = ["male"] * 10 + ["female"] * 8 + [None] * 2
    test = pd.DataFrame({"label": labels, "logit": logits, "group": [str(i) for i in range(20)], "sex": sex,
                         "source": "ham10000"})
    rows = {(r["variable"], r["value"]): r for r in subgroup_table(test, threshold=0.5, bootstrap=50)}
    assert set(rows) == {("source", "ham10000"), ("sex", "male"), ("sex", "female"), ("sex", "unknown")}
    men = rows[("sex", "male")]
    assert (men["n_images"], men["n_melanoma"], men["roc_auc"], men["note"]) == (10, 5, 1.0, "")
    assert men["sensitivity"] == 1.0 and men["specificity"] == 0.8  # logit 0.5 -> p 0.62 >= 0.5: one FP
    women = rows[("sex", "female")]
    assert np.isnan(women["roc_auc"]) and "too few for an AUC (2 melanoma, 6 other" in women["note"]
    assert women["sensitivity"] == 0.5 and women["specificity"] == 1.0
    unknown = rows[("sex", "unknown")]
    assert unknown["n_melanoma"] == 2 and "0 other" in unknown["note"] and np.isnan(unknown["specificity"])
    assert rows[("source", "ham10000")]["n_images"] == 20 and rows[("source", "ham10000")]["roc_auc"] > 0.8


def test_diagnosis_table_exact_per_benign_diagnosis_against_the_melanomas():
    from melanogan.classify.evaluate import diagnosis_table

    # 5 melanomas (logits 2, 3, 4, 5 and an in-situ one at -1); nevi mostly below them, seborrhoeic
    # keratoses among them, two dermatofibromas (too few), one image without a diagnosis
    dx = ["melanoma"] * 4 + ["melanoma in situ"] + ["nevus"] * 6 + ["seborrheic keratosis"] * 5 + \
        ["dermatofibroma"] * 2 + [None]
    logits = [2, 3, 4, 5, -1] + [-3, -2, -1, -4, -5, 2.5] + [4.5, 3.5, 0.5, -0.5, 1.5] + [0.0, 1.0] + [0.0]
    labels = [1] * 5 + [0] * 14
    test = pd.DataFrame({"label": labels, "logit": np.array(logits, dtype=float), "diagnosis": dx,
                         "group": [str(i) for i in range(19)]})
    rows = diagnosis_table(test, threshold=0.5, bootstrap=50)
    assert [(r["diagnosis"], r["melanoma"], r["n_images"]) for r in rows] == [
        ("melanoma", True, 4), ("melanoma in situ", True, 1), ("nevus", False, 6),
        ("seborrheic keratosis", False, 5), ("dermatofibroma", False, 2), ("unknown", False, 1)]
    by = {r["diagnosis"]: r for r in rows}
    # p >= 0.5 is logit >= 0: a melanoma diagnosis's share is its sensitivity, a benign one's its FP rate
    assert [by[d]["called_melanoma"] for d in ("melanoma", "melanoma in situ", "nevus", "seborrheic keratosis",
                                               "dermatofibroma", "unknown")] == [1.0, 0.0, 1 / 6, 0.8, 1.0, 1.0]
    # all 5 melanomas against the 6 nevi: 27.5 of 30 pairs ranked right (one tie at -1); against the
    # keratoses 15 of 25: the model tells melanoma from nevi, not from seborrhoeic keratoses
    assert by["nevus"]["roc_auc_vs_melanoma"] == pytest.approx(27.5 / 30)
    assert by["seborrheic keratosis"]["roc_auc_vs_melanoma"] == pytest.approx(15 / 25)
    lo, hi = by["seborrheic keratosis"]["roc_auc_vs_melanoma_ci95"]
    assert lo <= 0.6 <= hi and lo < hi
    assert by["melanoma"]["roc_auc_vs_melanoma"] is None and by["melanoma"]["note"] == ""
    assert np.isnan(by["dermatofibroma"]["roc_auc_vs_melanoma"])
    assert by["dermatofibroma"]["note"] == "too few for an AUC (5 melanoma, 2 dermatofibroma; needs 5 of each)"
    # a higher threshold: logit >= log(0.8 / 0.2) = 1.386
    strict = {r["diagnosis"]: r["called_melanoma"] for r in diagnosis_table(test, threshold=0.8, bootstrap=10)}
    assert (strict["nevus"], strict["seborrheic keratosis"], strict["melanoma"]) == (1 / 6, 0.6, 1.0)
    # the temperature divides the logits before the threshold: T = 2 puts logit 2.5 at p 0.78 < 0.8
    # (the cut is now logit 2.77: 2 of the keratoses, 3 of the 4 melanomas)
    cooled = {r["diagnosis"]: r["called_melanoma"] for r in diagnosis_table(test, 0.8, temperature=2.0, bootstrap=10)}
    assert (cooled["nevus"], cooled["seborrheic keratosis"], cooled["melanoma"]) == (0.0, 0.4, 0.75)


def test_skin_tone_of_an_older_estimate_is_not_reported_as_current(tmp_path, demo_prepared):
    import json

    from melanogan.classify.evaluate import current_skin_tone
    from melanogan.data.skin import SKIN_TONE_VERSION

    assert current_skin_tone(demo_prepared)  # prepared by this version
    (tmp_path / "prepare.json").write_text(json.dumps({"skin_tone_version": SKIN_TONE_VERSION - 1}))
    assert not current_skin_tone(tmp_path) and not current_skin_tone(tmp_path / "missing")


@pytest.mark.parametrize(("option", "module"), [("randconv", "RandomConvolution"), ("amplitude", "AmplitudeMix")])
def test_style_augment_filters_every_training_batch_and_nothing_else(demo_prepared, tmp_path, monkeypatch, option,
                                                                     module):
    import melanogan.classify.train as train_module

    calls = []

    class Spy(getattr(train_module, module)):
        def forward(self, x, generator=None, params=None):
            calls.append(tuple(x.shape))
            return super().forward(x, generator, params)

    monkeypatch.setattr(train_module, module, Spy)
    train_classifier(demo_prepared, tmp_path / "plain", TrainConfig(**{**TINY, "epochs": 1}), progress=False)
    assert calls == []  # off by default
    cfg = TrainConfig(**{**TINY, "epochs": 1, "style_augment": option})
    train_classifier(demo_prepared, tmp_path / "style", cfg, progress=False)
    steps = len((tmp_path / "style" / "stats.jsonl").read_text().splitlines())
    n_train = int((pd.read_parquet(demo_prepared / "manifest.parquet")["split"] == "train").sum())
    assert steps == 1 and len(calls) == n_train // TINY["batch_size"]  # every training batch, once
    assert all(shape[1:] == (3, 32, 32) for shape in calls)  # after the resize to the model's input
    plain = load_file(tmp_path / "plain" / "last" / "model.safetensors")
    style = load_file(tmp_path / "style" / "last" / "model.safetensors")
    assert any(not torch.equal(plain[k], style[k]) for k in plain)
    assert load_model(tmp_path / "style" / "best")[1].style_augment == option  # the run records it


def test_source_balanced_sampling_draws_every_real_source_equally_and_keeps_the_synthetic_share():
    import torch

    from melanogan.classify.train import SYNTHETIC_GROUP, source_balanced_indices

    sources = np.array(["ham"] * 900 + ["derm"] * 100 + [SYNTHETIC_GROUP] * 250, dtype=object)
    drawn = np.array(source_balanced_indices(sources, torch.Generator().manual_seed(5)))
    assert len(drawn) == len(sources)
    share = {g: (sources[drawn] == g).mean() for g in ("ham", "derm", SYNTHETIC_GROUP)}
    # synthetic images keep their 20% of the training set; the 80% left is split evenly between sources
    assert abs(share[SYNTHETIC_GROUP] - 0.2) < 0.03
    assert abs(share["ham"] - 0.4) < 0.03 and abs(share["derm"] - 0.4) < 0.03  # uniform would give 0.72 / 0.08
    # exact weights: the draw is torch.multinomial over them, reproducible from the generator
    w = np.array([0.8 / (2 * 900)] * 900 + [0.8 / (2 * 100)] * 100 + [1 / 1250] * 250)
    reference = torch.multinomial(torch.as_tensor(w, dtype=torch.double), len(w), replacement=True,
                                  generator=torch.Generator().manual_seed(5)).tolist()
    assert drawn.tolist() == reference
    shares = [source_balanced_indices(sources, torch.Generator().manual_seed(5), r, 2) for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == sorted(drawn.tolist())


def _two_source_demo(demo_raw: Path, data: Path) -> pd.DataFrame:
    """The demo data prepared at 32 px into `data`, its rows given two sources (every third row
    clinic-a, the rest clinic-b), as two `--source` options would: the demo data is one source."""
    prepare([("siim-isic-2020", demo_raw)], data, CacheOptions(size=32), seed=0)
    manifest = pd.read_parquet(data / "manifest.parquet")
    manifest["source"] = np.where(np.arange(len(manifest)) % 3 == 0, "clinic-a", "clinic-b")
    write_parquet(data / "manifest.parquet", manifest)
    return manifest


def test_the_source_sampler_reaches_the_training_loop_with_each_rows_source(demo_raw, tmp_path, monkeypatch):
    import melanogan.classify.train as train_module

    seen = []
    real = train_module.source_balanced_indices

    def spy(sources, *args, **kwargs):
        seen.append(np.asarray(sources))
        return real(sources, *args, **kwargs)

    monkeypatch.setattr(train_module, "source_balanced_indices", spy)
    data = tmp_path / "data"
    manifest = _two_source_demo(demo_raw, data)
    cfg = TrainConfig(**{**TINY, "epochs": 1, "sampler": "source"})
    train_classifier(data, tmp_path / "run", cfg, progress=False)
    train_rows = manifest[manifest["split"] == "train"]
    train_rows = train_rows[train_rows["label"].isin([0, 1])]
    assert len(seen) == 1 and sorted(seen[0].tolist()) == sorted(train_rows["source"].tolist())


def test_coral_compares_each_training_batch_by_the_rows_sources(demo_raw, demo_prepared, tmp_path, monkeypatch):
    import melanogan.classify.coral as coral_module

    seen = []
    real = coral_module.coral_penalty

    def spy(features, groups):
        penalty = real(features, groups)
        seen.append((features.detach().clone(), groups.clone(), float(penalty)))
        return penalty

    monkeypatch.setattr(coral_module, "coral_penalty", spy)
    data = tmp_path / "data"
    manifest = _two_source_demo(demo_raw, data)
    cfg = TrainConfig(**{**TINY, "epochs": 1, "coral": 1.0})
    train_classifier(data, tmp_path / "run", cfg, progress=False)
    train_rows = manifest[(manifest["split"] == "train") & manifest["label"].isin([0, 1])]
    n_batches = len(train_rows) // TINY["batch_size"]
    assert len(seen) == n_batches and all(len(g) == TINY["batch_size"] for _, g, _ in seen)
    # each image's group is its row's source (codes in name order: clinic-a 0, clinic-b 1): over the
    # epoch the batches hold the training rows' sources, each row once (drop_last leaves out the rest)
    counts = np.bincount(torch.cat([g for _, g, _ in seen]).numpy(), minlength=2)
    expected = train_rows["source"].map({"clinic-a": 0, "clinic-b": 1}).value_counts().sort_index().to_numpy()
    assert (counts <= expected).all() and counts.sum() == n_batches * TINY["batch_size"]
    assert expected.sum() - counts.sum() < TINY["batch_size"]
    # the penalty is computed on the batch's backbone features (positive where two sources differ)
    assert any(p > 0 for _, _, p in seen) and all(f.shape[1] == 256 for f, _, _ in seen)
    record = json.loads((tmp_path / "run" / "stats.jsonl").read_text().splitlines()[0])
    assert record["train_coral"] == pytest.approx(np.mean([p for _, _, p in seen]))
    assert load_model(tmp_path / "run" / "best")[1].coral == 1.0
    # a run without it never computes it, and records none
    seen.clear()
    train_classifier(data, tmp_path / "plain", TrainConfig(**{**TINY, "epochs": 1}), progress=False)
    assert seen == [] and "train_coral" not in (tmp_path / "plain" / "stats.jsonl").read_text()
    assert TrainConfig().coral == 0.0  # off until measured (README, Models that travel)
    # one training source: nothing to align, refused before any training
    with pytest.raises(MelanoganError, match="one source"):
        train_classifier(demo_prepared, tmp_path / "one", cfg, progress=False)
    assert not (tmp_path / "one" / "stats.jsonl").exists()
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(coral=1.0, mixup=0.2)


def test_mixstyle_and_lab_colour_reach_the_training_loop(demo_prepared, tmp_path, monkeypatch):
    import melanogan.classify.train as train_module
    from melanogan.classify.mixstyle import MixStyle

    batches = []

    class Spy(MixStyle):
        def next_batch(self, n, g=None):
            super().next_batch(n, g)
            batches.append(n)

    monkeypatch.setattr(train_module, "MixStyle", Spy)
    cfg = TrainConfig(**{**TINY, "epochs": 1, "style_augment": "mixstyle", "color_augment": "lab"})
    train_classifier(demo_prepared, tmp_path / "mix", cfg, progress=False)
    n_train = int((pd.read_parquet(demo_prepared / "manifest.parquet")["split"] == "train").sum())
    assert batches == [TINY["batch_size"]] * (n_train // TINY["batch_size"])  # a draw per training batch
    saved = load_model(tmp_path / "mix" / "best")[1]
    assert (saved.style_augment, saved.color_augment) == ("mixstyle", "lab")
    with pytest.raises(ValueError, match="classic batch augmentation"):
        TrainConfig(color_augment="lab", augment="strong")
    with pytest.raises(ValueError, match="classic batch augmentation"):
        TrainConfig(color_augment="lab", batch_augment=False)


def test_illumination_augment_lights_every_training_batch_and_is_recorded(demo_prepared, tmp_path, monkeypatch):
    import melanogan.classify.train as train_module
    from melanogan.data.batch_augment import BatchAugment

    lit = []

    class Spy(BatchAugment):
        def forward(self, x, generator=None, params=None):
            out = super().forward(x, generator, params)
            lit.append(self.illumination)
            return out

    monkeypatch.setattr(train_module, "BatchAugment", Spy)
    cfg = TrainConfig(**{**TINY, "epochs": 1, "illumination_augment": "random"})
    train_classifier(demo_prepared, tmp_path / "lit", cfg, progress=False)
    n_train = int((pd.read_parquet(demo_prepared / "manifest.parquet")["split"] == "train").sum())
    assert lit == ["random"] * (n_train // TINY["batch_size"])  # every training batch; validation is not augmented
    assert load_model(tmp_path / "lit" / "best")[1].illumination_augment == "random"
    assert TrainConfig().illumination_augment == "none"  # off until measured (README, Models that travel)
    for refused in ({"batch_augment": False}, {"augment": "none"}):
        with pytest.raises(ValueError, match="step of batch augmentation"):
            TrainConfig(illumination_augment="random", **refused)


def test_crop_aspect_and_grayscale_reach_every_training_batch_and_are_recorded(demo_prepared, tmp_path, monkeypatch):
    import melanogan.classify.train as train_module
    from melanogan.data.batch_augment import BatchAugment

    seen = []

    class Spy(BatchAugment):
        def sample(self, n, generator=None):
            p = super().sample(n, generator)
            seen.append((self.aspect, self.grayscale, "grey" in p))
            return p

    monkeypatch.setattr(train_module, "BatchAugment", Spy)
    cfg = TrainConfig(**{**TINY, "epochs": 1, "crop_aspect": 4 / 3, "grayscale": 0.2})
    train_classifier(demo_prepared, tmp_path / "wide", cfg, progress=False)
    n_train = int((pd.read_parquet(demo_prepared / "manifest.parquet")["split"] == "train").sum())
    # every training batch drew its crops from [3/4, 4/3] and which of its images turn grey
    assert seen == [(4 / 3, 0.2, True)] * (n_train // TINY["batch_size"])
    saved = load_model(tmp_path / "wide" / "best")[1]
    assert (saved.crop_aspect, saved.grayscale) == (4 / 3, 0.2)
    # the preset's own range and no greyscale until measured (README, Models that travel)
    assert (TrainConfig().crop_aspect, TrainConfig().grayscale) == (None, 0.0)
    for refused in ({"batch_augment": False}, {"augment": "none"}):
        for setting in ({"crop_aspect": 4 / 3}, {"grayscale": 0.2}):
            with pytest.raises(ValueError, match="step of batch augmentation"):
                TrainConfig(**setting, **refused)
    with pytest.raises(ValueError):
        TrainConfig(crop_aspect=0.75)  # A is the wider end: [1/A, A]
    with pytest.raises(ValueError):
        TrainConfig(grayscale=1.5)


def test_weight_decay_reaches_the_optimiser_and_the_run_and_bad_optimiser_settings_are_refused(demo_prepared,
                                                                                                tmp_path):
    cfg = TrainConfig(**{**TINY, "epochs": 1, "weight_decay": 0.05})
    train_classifier(demo_prepared, tmp_path / "wd", cfg, progress=False)
    groups = torch.load(tmp_path / "wd" / "last" / "optimizer.pt", weights_only=True)["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05]  # what AdamW applied, not only what was asked
    assert yaml.safe_load((tmp_path / "wd" / "config.yaml").read_text())["weight_decay"] == 0.05
    assert (TrainConfig().lr, TrainConfig().weight_decay) == (2e-3, 1e-4)  # unchanged until measured
    for bad in ({"lr": 0.0}, {"lr": -1e-3}, {"lr": float("nan")}, {"weight_decay": -0.01},
                {"weight_decay": float("nan")}, {"weight_decay": 2.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


def _rows(uids, hashes, ids, phashes):
    return pd.DataFrame({"uid": uids, "content_hash": hashes, "image_id": ids, "phash": phashes})


def test_seen_in_training_finds_same_file_same_isic_id_and_near_phash(tmp_path):
    from melanogan.classify.evaluate import seen_in_training

    far, near = "f" * 64, "0" * 63 + "1"  # 256 bits from 0...0, and 1 bit from it
    own = _rows(["o1", "o2", "o3"], ["h1", "h2", "h3"], ["ISIC_0000017", "x", "y"], ["0" * 64, "a" * 64, "5" * 64])
    own.to_parquet(tmp_path / "manifest.parquet")
    site = _rows(["same-file", "same-isic", "near", "new"], ["h1", "s2", "s3", "s4"],
                 ["a", "ISIC_0000017_downsampled", "b", "c"], [far, far, near, far])
    # "same-file" shares a content hash, "same-isic" the archive id, "near" is 1 bit from o1's hash
    assert seen_in_training(tmp_path / "site", site, tmp_path) == {"same-file", "same-isic", "near"}
    assert seen_in_training(tmp_path, own, tmp_path) == set()  # its own data: the splits keep them apart
    assert seen_in_training(tmp_path / "site", site, tmp_path / "moved") is None  # cannot check: says so


def test_select_worst_source_auc_picks_the_epoch_where_the_weakest_source_ranks_best(demo_prepared, tmp_path,
                                                                                   monkeypatch):
    import melanogan.classify.train as train_module

    y = pd.read_parquet(demo_prepared / "manifest.parquet").query("split == 'val'")["label"].to_numpy()
    assert (y.sum(), len(y)) == (2, 9)  # the demo's validation split, which the scores below are built for
    # two sources, each with one melanoma: the melanomas and the others alternate between them
    groups = np.empty(len(y), dtype=object)
    for cls in (0, 1):
        idx = np.flatnonzero(y == cls)
        groups[idx] = ["a" if i % 2 == 0 else "b" for i in range(len(idx))]
    in_a = groups == "a"
    # epoch 1: source a perfect, source b inverted but above a's others -> pooled 11/14, worst 0
    epoch1 = np.where(in_a, np.where(y == 1, 11.0, 0.0), np.where(y == 1, 5.0, 6.0))
    # epoch 2: melanomas at 1, others at 0 or 2 in turn -> pooled 8/14, worst (source a) 0.5
    epoch2 = np.where(y == 1, 1.0, 0.0)
    for g in ("a", "b"):
        others = np.flatnonzero((groups == g) & (y == 0))
        epoch2[others[:len(others) // 2]] = 2.0
    assert (M.roc_auc(y, epoch1), M.worst_group_auc(y, epoch1, groups)) == (11 / 14, 0.0)
    assert (M.roc_auc(y, epoch2), M.worst_group_auc(y, epoch2, groups)) == (8 / 14, 0.5)

    for select, chosen in (("auc", 1), ("worst_source_auc", 2)):
        scores = iter([epoch1, epoch2])
        monkeypatch.setattr(train_module, "predict_logits", lambda *a, s=scores, **k: next(s).astype(np.float32))
        monkeypatch.setattr(train_module, "val_sources", lambda val_set, cfg: groups.astype(str))
        summary = train_classifier(demo_prepared, tmp_path / select, TrainConfig(**{**TINY, "select": select}),
                                   progress=False)
        best = json.loads((tmp_path / select / "best" / "state.json").read_text())
        assert (summary["best_epoch"], best["epoch"], best["select"]) == (chosen, chosen, select)
        assert best["selected_by"] == pytest.approx((11 / 14, 0.5)[chosen - 1] if select == "auc" else 0.5)
        stats = [json.loads(x) for x in (tmp_path / select / "stats.jsonl").read_text().splitlines()]
        assert [s["val_auc_by_source"] for s in stats] == [{"a": 1.0, "b": 0.0}, {"a": 0.5, "b": pytest.approx(2 / 3)}]


def test_select_worst_source_auc_refuses_when_no_source_has_both_classes(demo_prepared, tmp_path):
    from melanogan.classify.train import val_sources

    class Val:  # one source whose validation images are all one class
        rows = pd.DataFrame({"source": ["x", "x", "y"]})
        labels = np.array([0, 0, 1])

    with pytest.raises(MelanoganError, match=r"needs a training source.*select 'auc'"):
        val_sources(Val(), TrainConfig(select="worst_source_auc"))
    assert list(val_sources(Val(), TrainConfig())) == ["x", "x", "y"]  # auc needs no per-source classes


def test_weight_average_is_what_is_validated_kept_and_resumed(demo_prepared, tmp_path, monkeypatch):
    import melanogan.classify.train as train_module

    def weights(path):
        return {k: v.float() for k, v in load_file(path).items()}

    cfg = TrainConfig(**{**TINY, "epochs": 2, "weight_average": "ema", "ema_decay": 0.9})
    scored = []
    real_predict = train_module.predict_logits

    def spy(model, *a, **k):
        scored.append({k2: v.detach().clone().float() for k2, v in model.state_dict().items()})
        return real_predict(model, *a, **k)

    monkeypatch.setattr(train_module, "predict_logits", spy)
    train_classifier(demo_prepared, tmp_path / "a", cfg, progress=False)
    monkeypatch.setattr(train_module, "predict_logits", real_predict)
    ema = weights(tmp_path / "a" / "last" / "ema.safetensors")
    raw = weights(tmp_path / "a" / "last" / "model.safetensors")
    assert int(ema.pop("n_averaged")) == 2 * (int((pd.read_parquet(demo_prepared / "manifest.parquet")["split"]
                                                   == "train").sum()) // TINY["batch_size"])  # once a step
    average = {k.removeprefix("module."): v for k, v in ema.items()}
    assert average.keys() == raw.keys()
    assert any(not torch.allclose(average[k], raw[k]) for k in raw if raw[k].is_floating_point())  # not the weights
    # the last validation scored the average, not the trained weights
    assert all(torch.equal(scored[-1][k], average[k]) for k in raw)
    # best/ holds the average of its epoch, as that epoch's validation scored it
    best = json.loads((tmp_path / "a" / "best" / "state.json").read_text())["epoch"]
    kept = weights(tmp_path / "a" / "best" / "model.safetensors")
    assert len(scored) == 2 and all(torch.equal(kept[k], scored[best - 1][k]) for k in raw)
    # resuming goes on with the same average
    train_classifier(demo_prepared, tmp_path / "b", cfg, progress=False, stop_after_epochs=1)
    train_classifier(demo_prepared, tmp_path / "b", cfg, resume=True, progress=False)
    resumed = weights(tmp_path / "b" / "last" / "ema.safetensors")
    assert all(np.allclose(resumed[k].numpy(), ema[k].numpy(), atol=1e-6) for k in ema)
    (tmp_path / "b" / "last" / "ema.safetensors").unlink()
    with pytest.raises(MelanoganError, match=r"ema\.safetensors is missing"):
        train_classifier(demo_prepared, tmp_path / "b", cfg.model_copy(update={"epochs": 3}), resume=True,
                         progress=False)


def test_the_weight_average_is_the_bias_corrected_exponential_average_of_every_step():
    from melanogan.classify.train import ema_decay_at, ema_update

    # decay 0.5, weights 1, 2, 4 after three steps: (0.25 * 1 + 0.5 * 2 + 4) / 1.75 = 3
    assert ema_decay_at(0.5, 1) == pytest.approx(1 / 3) and ema_decay_at(0.5, 2) == pytest.approx(3 / 7)
    averaged, counter = [torch.tensor([1.0])], [torch.tensor([5])]
    update = ema_update(0.5)
    for n, w in ((1, 2.0), (2, 4.0)):
        update(averaged, [torch.tensor([w])], torch.tensor(n))
    assert averaged[0].item() == pytest.approx(3.0)
    update(counter, [torch.tensor([9])], torch.tensor(1))  # an integer buffer takes the current value
    assert counter[0].item() == 9
    # a long run: the correction fades (within decay^n of the plain EMA's decay)
    assert ema_decay_at(0.998, 3000) == pytest.approx(0.998, abs=1e-5)


def test_sources_that_each_hold_one_class_leave_the_pooled_choice_running(demo_prepared, tmp_path, monkeypatch):
    import melanogan.classify.train as train_module

    # every validation melanoma from one source, every other image from another: no per-source AUC
    monkeypatch.setattr(train_module, "val_sources", lambda val_set, cfg: np.where(val_set.labels == 1, "m", "o"))
    summary = train_classifier(demo_prepared, tmp_path / "run", TrainConfig(**{**TINY, "epochs": 1}), progress=False)
    record = json.loads((tmp_path / "run" / "stats.jsonl").read_text().splitlines()[0])
    assert summary["best_epoch"] == 1 and record["val_auc_by_source"] == {}
    assert math.isnan(record["val_auc_worst_source"]) and not math.isnan(record["val_auc"])


def test_excised_draw_exact_weights_and_flags():
    from types import SimpleNamespace

    import torch

    from melanogan.classify.train import excised_flags, excised_indices

    rows = pd.DataFrame({"label": [0, 0, 1, 0, 0], "meta_dx_type": ["histo", "follow_up", "histo", None, "HISTO"]})
    train_set = SimpleNamespace(datasets=[SimpleNamespace(dataset=SimpleNamespace(rows=rows)), [None] * 3])
    # benign and excised only (a histopathology-confirmed melanoma is no hard negative); synthetic: never
    assert excised_flags(train_set).tolist() == [True, False, False, False, True, False, False, False]
    no_column = SimpleNamespace(datasets=[SimpleNamespace(dataset=SimpleNamespace(rows=rows[["label"]]))])
    assert not excised_flags(no_column).any()
    # each flagged item 4 times as likely: over 200,000 draws the shares are 4/7 and 1/7 each
    flags = np.array([True, False, False, False])
    draws = []
    for rank in (0, 1):  # two ranks share one draw
        draws.append(excised_indices(np.tile(flags, 50_000), 4.0, torch.Generator().manual_seed(3), rank, 2))
    assert len(draws[0]) == len(draws[1]) == 100_000
    both = np.array(draws[0] + draws[1]) % 4
    assert np.bincount(both, minlength=4) / len(both) == pytest.approx([4 / 7, 1 / 7, 1 / 7, 1 / 7], abs=0.005)
    one = excised_indices(np.tile(flags, 50_000), 4.0, torch.Generator().manual_seed(3))
    assert one[0::2] == draws[0] and one[1::2] == draws[1]
    assert TrainConfig().excised_weight == 1.0  # off until measured (README, Models that travel)
    with pytest.raises(ValueError, match="cannot be combined with sampler 'balanced'"):
        TrainConfig(excised_weight=3, sampler="balanced")
    with pytest.raises(ValueError):
        TrainConfig(excised_weight=0.5)


def test_excised_weight_draws_the_flagged_training_images_and_says_so(demo_prepared, tmp_path, monkeypatch):
    import shutil

    import melanogan.classify.train as train_module

    data = tmp_path / "data"
    shutil.copytree(demo_prepared, data)
    manifest = pd.read_parquet(data / "manifest.parquet")
    benign_train = manifest.index[(manifest["split"] == "train") & (manifest["label"] == 0)]
    manifest["meta_dx_type"] = pd.Series("follow_up", index=manifest.index, dtype="string")
    manifest.loc[benign_train[::3], "meta_dx_type"] = "histo"
    manifest.to_parquet(data / "manifest.parquet", index=False)
    calls = []
    real = train_module.excised_indices

    def spy(flags, weight, generator, rank=0, world_size=1):
        calls.append((np.asarray(flags).copy(), weight))
        return real(flags, weight, generator, rank, world_size)

    monkeypatch.setattr(train_module, "excised_indices", spy)
    summary = train_classifier(data, tmp_path / "run", TrainConfig(**{**TINY, "epochs": 2, "excised_weight": 3.0}),
                               progress=False)
    n = len(benign_train[::3])
    assert len(calls) == 2 and all(w == 3.0 and f.sum() == n for f, w in calls)  # one weighted draw per epoch
    assert f"excised_weight 3: {n} excised benign training images drawn that much more often" in summary["notes"]
    # no source that says how its diagnoses were confirmed: a plain shuffle, and the run says so
    calls.clear()
    cfg = TrainConfig(**{**TINY, "epochs": 1, "excised_weight": 3.0})
    plain = train_classifier(demo_prepared, tmp_path / "plain", cfg, progress=False)
    assert calls == [] and any("a plain shuffle, as without it" in note for note in plain["notes"])


def test_mixup_mixes_every_training_batch_and_its_targets_and_keeps_the_augmentation_draws(demo_prepared, tmp_path,
                                                                                            monkeypatch):
    import melanogan.classify.mixup as mixup_module
    import melanogan.classify.train as train_module
    from melanogan.data.batch_augment import BatchAugment

    augmented, draws, mixed = {}, [], []
    real_draw, real_mixed_loss = mixup_module.draw, mixup_module.mixed_loss

    class Spy(BatchAugment):
        def forward(self, x, generator=None, params=None):
            out = super().forward(x, generator, params)
            augmented.setdefault(run, []).append(out.clone())
            return out

    def spy_draw(n, alpha, rng):
        draws.append((n, alpha))
        return real_draw(n, alpha, rng)

    def spy_mixed_loss(objective, d, y, diagnosis):
        mixed.append((y.tolist(), y[d.partner].tolist()))
        return real_mixed_loss(objective, d, y, diagnosis)

    monkeypatch.setattr(train_module, "BatchAugment", Spy)
    monkeypatch.setattr(mixup_module, "draw", spy_draw)
    monkeypatch.setattr(mixup_module, "mixed_loss", spy_mixed_loss)
    for run, alpha in (("plain", 0.0), ("mixed", 0.2)):
        train_classifier(demo_prepared, tmp_path / run, TrainConfig(**{**TINY, "epochs": 1, "mixup": alpha}),
                         progress=False)
    n_train = int((pd.read_parquet(demo_prepared / "manifest.parquet")["split"] == "train").sum())
    n_batches = n_train // TINY["batch_size"]
    assert draws == [(TINY["batch_size"], 0.2)] * n_batches  # a draw per training batch of the mixup run only
    # the partners' labels reach the loss
    assert len(mixed) == n_batches and any(own != partners for own, partners in mixed)
    # mixup has its own random stream: the batches it mixes are the ones the run without it saw
    assert all(torch.equal(a, b) for a, b in zip(augmented["plain"], augmented["mixed"], strict=True))
    assert load_model(tmp_path / "mixed" / "best")[1].mixup == 0.2
    assert TrainConfig().mixup == 0.0  # off until measured (README, Models that travel)
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(mixup=0.2, metadata="age,sex")
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        TrainConfig(mixup=-0.1)


def test_a_step_budget_stops_mid_epoch_at_that_step_and_the_schedule_spans_it(demo_prepared, tmp_path, monkeypatch):
    import melanogan.classify.train as train_module

    n_train = int((pd.read_parquet(demo_prepared / "manifest.parquet")["split"] == "train").sum())
    per_epoch = n_train // TINY["batch_size"]
    budget = per_epoch + 2  # two steps into the second of three epochs
    progress = []

    def spy(step, total_steps, elapsed, limit):
        progress.append(_progress(step, total_steps, elapsed, limit))
        return progress[-1]

    monkeypatch.setattr(train_module, "_progress", spy)
    cfg = TrainConfig(**{**TINY, "epochs": 3, "max_steps": budget})
    summary = train_classifier(demo_prepared, tmp_path / "run", cfg, progress=False)
    assert (summary["steps"], summary["epochs"], summary["stopped_by"]) == (budget, 2, "step budget")
    # the learning-rate schedule ends at the step budget (cosine to zero at its last step), not at epoch 3
    assert progress == pytest.approx([(i + 1) / budget for i in range(budget)])
    records = (tmp_path / "run" / "stats.jsonl").read_text().splitlines()
    assert len(records) == 2  # the cut epoch is validated and kept like a full one
    # resuming a run whose step budget is spent trains nothing more
    again = train_classifier(demo_prepared, tmp_path / "run", cfg, resume=True, progress=False)
    assert (again["steps"], again["epochs"], again["stopped_by"]) == (budget, 2, "step budget")
    assert len(progress) == budget
    # larger than the epochs allow: the epochs end the run as before, and the schedule spans them
    progress.clear()
    summary = train_classifier(demo_prepared, tmp_path / "long", cfg.model_copy(update={"max_steps": 10_000}),
                               progress=False)
    assert (summary["steps"], summary["stopped_by"]) == (3 * per_epoch, "epochs")
    assert progress[-1] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        TrainConfig(max_steps=0)
