"""bench travel's lever comparison: paired on the same report images, exact on constructed scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from melanogan.bench import travel
from melanogan.bench.travel import _paired, parse_levers, run
from melanogan.data.cache import CacheOptions
from melanogan.errors import MelanoganError
from melanogan.runtime import machine_info


def test_lever_difference_is_paired_on_the_images_both_runs_scored():
    rng = np.random.default_rng(0)
    n = 200
    label = np.r_[np.ones(40, int), np.zeros(n - 40, int)]
    first = pd.DataFrame({"uid": [f"u{i}" for i in range(n)], "label": label, "group": [f"g{i // 2}" for i in range(n)],
                          "logit": rng.normal(size=n) + 0.5 * label})
    better = first.assign(logit=first["logit"] + 2.0 * label)  # the lever separates the classes more
    extra = pd.DataFrame({"uid": ["only-in-one"], "label": [1], "group": ["x"], "logit": [9.0]})
    result = _paired(first, pd.concat([better, extra], ignore_index=True))
    from sklearn.metrics import roc_auc_score

    expected = roc_auc_score(label, better["logit"]) - roc_auc_score(label, first["logit"])
    assert result["images"] == n and result["difference"] == pytest.approx(expected, abs=1e-4)
    assert result["ci95"][0] > 0 and result["p_value"] < 0.01
    same = _paired(first, first)
    assert same["difference"] == 0 and same["p_value"] == 1.0


def test_an_unknown_lever_value_fails_before_any_work(tmp_path):
    for folder in ("ham10000_224", "isic9_180", "derm7pt_384"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    with pytest.raises(MelanoganError, match="resize mode 'zoom' is unknown"):
        run(tmp_path, vary=("resize_mode=lesion", "resize_mode=zoom"))
    for holdout in [(), ("derm7pt", "derm7pt"), ("ph2",)]:
        with pytest.raises(MelanoganError, match="at most once, at least one"):
            run(tmp_path, holdout=holdout)


def test_levers_are_typed_and_checked_before_any_work():
    levers = parse_levers(("resize_mode=lesion", "augment=strong", "image-size=192", "tta=8",
                           "color_constancy=false", "minutes=2.5", "ensemble=3", "color_augment=lab",
                           "style_augment=mixstyle", "epochs=30", "select=worst_source_auc", "weight_average=ema",
                           "illumination_augment=random", "mixup=0.2", "excised_weight=3", "loss=focal", "coral=1",
                           "crop_aspect=1.3333", "grayscale=0.2", "weight_decay=0.05", "lr=5e-3", "white_level=180",
                           "clahe=2"))
    assert [(k, v) for _, settings in levers for k, v in settings.items()] == [
        ("resize_mode", "lesion"), ("augment", "strong"), ("image_size", 192), ("tta", 8),
        ("color_constancy", False), ("minutes", 2.5), ("ensemble", 3), ("color_augment", "lab"),
        ("style_augment", "mixstyle"), ("epochs", 30), ("select", "worst_source_auc"), ("weight_average", "ema"),
        ("illumination_augment", "random"), ("mixup", 0.2), ("excised_weight", 3.0), ("loss", "focal"),
        ("coral", 1.0), ("crop_aspect", 1.3333), ("grayscale", 0.2), ("weight_decay", 0.05), ("lr", 0.005),
        ("white_level", 180), ("clahe", 2.0)]
    for bad, message in [("zoom=2", "KEY one of"), ("augment=wild", "augment"), ("tta=3", "--tta 3"),
                         ("color_constancy=maybe", "not true or false"), ("minutes=0", "positive"),
                         ("resize_mode", "KEY=VALUE"), ("ensemble=1", "2 to 16"),
                         ("color_augment=hsv", "color_augment"), ("style_augment=mix", "style_augment"),
                         ("illumination_augment=flash", "illumination_augment"), ("mixup=-1", "mixup"),
                         ("coral=-1", "coral"), ("white_level=300", "white level 300 is out of range"),
                         ("white_level=bright", "invalid literal"),
                         ("clahe=0.5", "CLAHE clip limit 0.5 is out of range"), ("clahe=high", "could not convert"),
                         ("crop_aspect=0.75", "crop_aspect"),
                         ("crop_aspect=1.3+augment=none", "step of batch augmentation"),
                         ("grayscale=1.5", "grayscale"), ("grayscale=0.2+augment=none", "step of batch augmentation"),
                         ("coral=1+mixup=0.2", "not both"), ("weight_decay=-0.01", "weight_decay"),
                         ("weight_decay=2", "weight_decay"), ("lr=0", "lr"), ("lr=nan", "lr"),
                         ("excised_weight=0.5", "excised_weight"), ("excised_weight=3+sampler=balanced", "combined"),
                         ("epochs=0", "1 to 500"), ("epochs=2.5", "epochs"), ("select=pooled", "select"),
                         ("weight_average=swa", "weight_average"), ("patience=off", "join it to one"),
                         ("epochs=30+patience=0", "or off"), ("epochs=30+epochs=20", "epochs twice"),
                         ("epochs=30+zoom=2", "KEY one of"), ("epochs=30+minutes=16", "two budgets"),
                         ("ensemble=3+epochs=30", "two budgets"), ("model=resnet7", "unknown model"),
                         ("sampler=sources", "sampler"), ("loss=hinge", "loss"),
                         ("adapt=bn", "none, batchnorm or head"),
                         ("adapt=batchnorm+tta=8", "neither tta nor ensemble"),
                         ("ensemble=2+adapt=batchnorm", "neither tta nor ensemble"),
                         ("adapt_layers=3", "join them"), ("adapt=batchnorm+adapt_layers=0", "at least 1"),
                         ("hair_method=blackhat", "join hair_removal=true"),
                         ("hair_removal=false+hair_method=lines", "join hair_removal=true"),
                         ("hair_removal=true+hair_method=razor", "hair method 'razor' is unknown")]:
        with pytest.raises(MelanoganError, match=message):
            parse_levers((bad,))
    with pytest.raises(MelanoganError, match="twice"):
        parse_levers(("tta=8", "tta=8"))
    assert parse_levers(("hair_removal=true+hair_method=blackhat",)) == [
        ("hair_removal=true+hair_method=blackhat", {"hair_removal": True, "hair_method": "blackhat"})]
    # the GAN arm: a count per class, and how its GAN trains only joined to it
    assert parse_levers(("gan=1000", "gan=500+gan_steps=20000+gan_resolution=128+gan_preset=default")) == [
        ("gan=1000", {"gan": 1000}),
        ("gan=500+gan_steps=20000+gan_resolution=128+gan_preset=default",
         {"gan": 500, "gan_steps": 20000, "gan_resolution": 128, "gan_preset": "default"})]
    for bad, message in [("gan=0", "1 to 100000"), ("gan=many", "gan"), ("gan=10+gan_steps=0", "at least 1"),
                         ("gan=10+gan_resolution=96", "32, 64, 128 or 256"),
                         ("gan=10+gan_preset=gpu", "cpu or default"),
                         ("gan_steps=2000", "join them to it"), ("gan_resolution=128+gan_preset=default",
                                                                 "gan_preset, gan_resolution")]:
        with pytest.raises(MelanoganError, match=message):
            parse_levers((bad,))
    assert parse_levers(("model=small-cnn-ibn", "sampler=source")) == [
        ("model=small-cnn-ibn", {"model": "small-cnn-ibn"}), ("sampler=source", {"sampler": "source"})]
    assert parse_levers(("diagnosis_vocabulary=shared", "diagnosis_weight=0")) == [
        ("diagnosis_vocabulary=shared", {"diagnosis_vocabulary": "shared"}),
        ("diagnosis_weight=0", {"diagnosis_weight": 0.0})]
    for bad, message in [("diagnosis_vocabulary=merged", "diagnosis_vocabulary"),
                         ("diagnosis_vocabulary=shared+diagnosis_weight=0", "turns the head off")]:
        with pytest.raises(MelanoganError, match=message):
            parse_levers((bad,))
    # settings that belong together form one variant
    assert parse_levers(("epochs=30+patience=off", "epochs=30 + patience=4")) == [
        ("epochs=30+patience=off", {"epochs": 30, "patience": 0}),
        ("epochs=30 + patience=4", {"epochs": 30, "patience": 4})]


N_REPORT = 60
LABEL = np.r_[np.ones(20, int), np.zeros(N_REPORT - 20, int)]


def _fake_pipeline(tmp_path, monkeypatch) -> dict:
    """Fakes for prepare/train/evaluate/calibrate that record what each variant asked for; a model's
    report scores are LABEL * skill plus noise seeded by its run folder; training on isic9 fails."""
    for folder in ("ham10000_224", "isic9_180", "derm7pt_384"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    calls = {"prepare": [], "train": [], "evaluate": [], "calibrate": [], "cfg": []}
    n, label = N_REPORT, LABEL

    def fake_prepare(sources, out, options, fractions=None, seed=0):
        calls["prepare"].append((Path(out).name, str(options.resize_mode), options.size))
        Path(out).mkdir(parents=True)

    def fake_train(data_dir, run_dir, cfg, accelerator="auto", progress=True):
        if "isic9" in Path(data_dir).name or cfg.diagnosis_weight == 0.123:
            raise RuntimeError("stopped midway")
        calls["train"].append((Path(data_dir).name, cfg.augment, cfg.image_size, cfg.seed, cfg.max_minutes))
        calls["cfg"].append(cfg)
        assert cfg.batch_size == 16
        Path(run_dir).mkdir(parents=True)
        (Path(run_dir) / "skill.txt").write_text("2.0" if cfg.augment == "strong" else "1.0")
        (Path(run_dir) / "stats.jsonl").write_text('{"epoch": 1, "img_per_s": 10.0}\n{"epoch": 2, "img_per_s": 30.0}\n')
        # the precision a run resolved, as train writes it (a strong-augment run "resolves" another, so
        # that the row's precision is seen to be its own run's)
        (Path(run_dir) / "config.yaml").write_text(yaml.safe_dump(
            {**cfg.model_dump(mode="json"), "precision": "bf16-mixed" if cfg.augment == "strong" else "32-true"}))
        # a clock-budgeted run's steps differ from seed to seed (as a machine's speed does from run to run)
        return {"epochs": 3, "steps": cfg.max_steps or 100 + cfg.seed}

    def fake_evaluate(run_dir, data_dir=None, split=None, bootstrap=1000, tta=1, out=None, **kw):
        calls["evaluate"].append((Path(run_dir).name, tta))
        skill = float((Path(run_dir) / "skill.txt").read_text())
        rng = np.random.default_rng(int(Path(run_dir).name.rsplit("-", 1)[1]))  # each model its own noise
        Path(out).mkdir(parents=True)
        pd.DataFrame({"uid": [f"u{i}" for i in range(n)], "label": label, "group": [f"g{i}" for i in range(n)],
                      "logit": rng.normal(size=n) + skill * label}).to_csv(Path(out) / "predictions.csv", index=False)
        return {"out": str(out), "roc_auc": 0.5 + skill / 10, "roc_auc_ci95": [0.4, 0.9], "n_images": n,
                "n_melanoma": 20, "excluded_overlap": 0,
                "thresholds": {"val_youden": {"sensitivity": 0.5, "specificity": 0.5}}}

    def fake_calibrate(run_dir, data_dir, name, split="all", adapt_batchnorm=True, refit_head=None):
        # the plain site threshold is for the model's own scores: unadapted, its head as trained
        assert adapt_batchnorm is False and refit_head is False
        calls["calibrate"].append(Path(run_dir).name)
        return {"n_images": 30, "temperature": 1.0, "thresholds": {"val-youden": 0.5}}

    def fake_manifest(data_dir):
        if Path(data_dir).name.startswith("train-"):  # the training sources: benign train rows 3 naevi : 1 keratosis
            return pd.DataFrame({"split": ["train"] * 50 + ["val"] * 5 + ["train"] * 5,
                                 "label": [1] * 10 + [0] * 50,
                                 "source": ["ham10000"] * 55 + ["synthetic"] * 5,
                                 "diagnosis": ["mel"] * 10 + ["nv"] * 30 + ["bkl"] * 10 + ["bcc"] * 10})
        # the report part's: melanomas, then naevi and keratoses in turn
        return pd.DataFrame({"uid": [f"u{i}" for i in range(n)],
                             "diagnosis": ["melanoma" if y else ("nevus", "seborrheic keratosis")[i % 2]
                                           for i, y in enumerate(label)]})

    import melanogan.classify.calibrate as cal
    import melanogan.classify.evaluate as ev
    import melanogan.classify.train as tr
    import melanogan.data.manifest as man

    monkeypatch.setattr(man, "prepare", fake_prepare)
    monkeypatch.setattr(man, "load_manifest", fake_manifest)
    monkeypatch.setattr(tr, "train_classifier", fake_train)
    monkeypatch.setattr(ev, "evaluate_run", fake_evaluate)
    monkeypatch.setattr(cal, "calibrate_site", fake_calibrate)
    return calls


def test_each_lever_changes_its_own_setting_and_reuses_what_it_does_not_change(tmp_path, monkeypatch):
    """Fakes for prepare/train/evaluate record what each variant asked for: a framing lever
    re-prepares, a training lever retrains on the same data, TTA only re-evaluates the defaults' model."""
    calls = _fake_pipeline(tmp_path, monkeypatch)
    n, label = N_REPORT, LABEL
    result = travel.run(tmp_path, holdout=("derm7pt",), vary=("resize_mode=lesion", "augment=strong", "tta=8",
                                                              "ensemble=2", "color_augment=lab",
                                                              "style_augment=mixstyle"), batch_size=16)

    assert [p[1] for p in calls["prepare"]] == ["crop", "crop", "lesion", "lesion"]  # train + site, per framing
    assert [t[1:] for t in calls["train"]] == [("classic", 96, 0, 8.0), ("classic", 96, 0, 8.0),
                                               ("strong", 96, 0, 8.0), ("classic", 96, 0, 4.0),
                                               ("classic", 96, 1, 4.0), ("classic", 96, 0, 8.0),
                                               ("classic", 96, 0, 8.0)]  # the ensemble splits the budget
    base = calls["cfg"][0].model_dump()
    for cfg, changed in zip(calls["cfg"][-2:], ({"color_augment": "lab"}, {"style_augment": "mixstyle"}), strict=True):
        assert {k: v for k, v in cfg.model_dump().items() if base[k] != v} == changed  # its own setting only
    assert calls["train"][0][0] == calls["train"][2][0] != calls["train"][1][0]  # strong: the defaults' data
    assert [e[1] for e in calls["evaluate"]] == [1, 1, 1, 1, 1, 1, 8, 8, 1, 1, 1, 1, 1, 1, 1, 1]
    assert calls["evaluate"][6][0] == calls["evaluate"][0][0]  # TTA scores the defaults' own model
    assert len(calls["calibrate"]) == 5  # not for TTA or the ensemble: averaged logits need their own threshold
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["tta=8"]["site_threshold"] is None and rows["tta=8"]["vs_defaults"]["difference"] == 0
    assert rows["augment=strong"]["vs_defaults"]["difference"] > 0
    assert "vs_defaults" not in rows["defaults"] and rows["defaults"]["train_img_per_s"] == 20.0
    assert (rows["defaults"]["precision"], rows["augment=strong"]["precision"]) == ("32-true", "bf16-mixed")
    assert result["machine"] == machine_info("auto")  # what the figures were measured on
    # and the defaults' pixels as prepare made them that day (crop: the defaults', not the lesion lever's)
    assert result["cache_options"] == CacheOptions(size=256).to_dict()
    assert result["cache_options"]["resize_mode"] == "crop" and calls["prepare"][-1][1] == "lesion"
    ensemble = rows["ensemble=2"]  # scored by the members' mean logit
    rng3, rng4 = np.random.default_rng(3), np.random.default_rng(4)
    mean = (rng3.normal(size=n) + rng4.normal(size=n)) / 2 + label
    assert ensemble["external_auc"] == pytest.approx(roc_auc_score(label, mean), abs=1e-4)
    assert ensemble["members"] == 2 and ensemble["epochs"] == 6
    assert rows["defaults"]["internal_test_auc_ci95"] == [0.4, 0.9]  # evaluate's own CI, kept beside the AUC
    low, high = ensemble["internal_test_auc_ci95"]  # the ensemble's own bootstrap over its mean logits
    assert low < ensemble["internal_test_auc"] < high
    assert ensemble["site_threshold"] is None and ensemble["validation_threshold"] is None
    # the report part per diagnosis: the melanomas against each benign diagnosis alone, from the same
    # scores as the row's AUC; shares called melanoma only where a site threshold belongs to the scores
    dx = np.array(["melanoma" if y else ("nevus", "seborrheic keratosis")[i % 2] for i, y in enumerate(label)])
    for row, logits in ((ensemble, mean), (rows["defaults"], np.random.default_rng(0).normal(size=n) + label)):
        by = {d["diagnosis"]: d for d in row["report_by_diagnosis"]}
        assert [(d["diagnosis"], d["n_images"]) for d in row["report_by_diagnosis"]] == [
            ("melanoma", 20), ("nevus", 20), ("seborrheic keratosis", 20)]
        for name in ("nevus", "seborrheic keratosis"):
            keep = (label == 1) | (dx == name)
            assert by[name]["roc_auc_vs_melanoma"] == pytest.approx(roc_auc_score(label[keep], logits[keep]))
    assert all(d["called_melanoma"] is None for d in ensemble["report_by_diagnosis"])
    # the report part re-weighted to the training sources' benign mix (val and synthetic rows not in it)
    aucs = {}
    for name in ("nevus", "seborrheic keratosis"):
        keep = (label == 1) | (dx == name)
        aucs[name] = roc_auc_score(label[keep], logits[keep])  # the defaults' scores (last in the loop)
    mix = rows["defaults"]["case_mix"]
    assert mix["training_mix"] == {"nevus": 0.75, "benign keratosis": 0.25}
    assert mix["report_mix"] == {"nevus": 0.5, "benign keratosis": 0.5} and mix["training_mix_covered"] == 1.0
    expected = 0.75 * aucs["nevus"] + 0.25 * aucs["seborrheic keratosis"]
    assert mix["external_auc_at_training_mix"] == pytest.approx(expected)
    # at the report part's own mix it would be its plain AUC
    assert roc_auc_score(label, logits) == pytest.approx(0.5 * aucs["nevus"] + 0.5 * aucs["seborrheic keratosis"])
    assert mix["ci95"][0] < mix["external_auc_at_training_mix"] < mix["ci95"][1]
    defaults_nevi = next(d for d in rows["defaults"]["report_by_diagnosis"] if d["diagnosis"] == "nevus")
    expected = (np.random.default_rng(0).normal(size=n) + label)[dx == "nevus"]  # fake site threshold 0.5: logit 0
    assert defaults_nevi["called_melanoma"] == pytest.approx((expected >= 0).mean())
    assert all(r["vs_defaults"]["p_holm"] >= r["vs_defaults"]["p_value"] for r in result["rows"] if "vs_defaults" in r)
    assert result["complete"]

    # a comparison stopped midway keeps the held-out sources it finished
    with pytest.raises(RuntimeError, match="midway"):
        travel.run(tmp_path, holdout=("derm7pt", "isic9"), vary=("augment=strong",), json_out=tmp_path / "t.json",
                   batch_size=16)
    partial = json.loads((tmp_path / "t.json").read_text())
    assert not partial["complete"] and [r["held_out"] for r in partial["rows"]] == ["derm7pt", "derm7pt"]
    assert partial["rows"][1]["vs_defaults"]["difference"] > 0
    # ... and, within a source, every variant it finished (a device's time limit can end a GAN lever)
    (tmp_path / "t.json").unlink()
    with pytest.raises(RuntimeError, match="midway"):
        travel.run(tmp_path, holdout=("derm7pt",), vary=("augment=strong", "diagnosis_weight=0.123"),
                   json_out=tmp_path / "t.json", batch_size=16)
    partial = json.loads((tmp_path / "t.json").read_text())
    assert not partial["complete"] and [r["variant"] for r in partial["rows"]] == ["defaults", "augment=strong"]
    assert partial["rows"][1]["vs_defaults"]["difference"] > 0


def test_model_and_sampler_levers_change_only_their_own_setting(tmp_path, monkeypatch):
    calls = _fake_pipeline(tmp_path, monkeypatch)
    travel.run(tmp_path, holdout=("derm7pt",), vary=("model=small-cnn-ibn", "sampler=source"), batch_size=16)
    defaults, ibn, sampler = (c.model_dump() for c in calls["cfg"])
    assert defaults["model"] == "small-cnn" and defaults["sampler"] == "none"
    assert {k: v for k, v in ibn.items() if defaults[k] != v} == {"model": "small-cnn-ibn"}
    assert {k: v for k, v in sampler.items() if defaults[k] != v} == {"sampler": "source"}
    # another architecture cannot take weights made for --model: refused before any work
    with pytest.raises(MelanoganError, match="weights belong to --model"):
        travel.run(tmp_path, holdout=("derm7pt",), weights="imagenet", model="efficientnet_b0",
                   vary=("model=small-cnn-ibn",))
    assert len(calls["cfg"]) == 3


def test_an_epoch_budget_trains_like_train_and_select_and_ema_change_only_their_own_setting(tmp_path, monkeypatch):
    from melanogan.classify.train import TrainConfig

    calls = _fake_pipeline(tmp_path, monkeypatch)
    travel.run(tmp_path, holdout=("derm7pt",), vary=("epochs=30", "select=worst_source_auc", "weight_average=ema",
                                                     "epochs=30+patience=off", "epochs=12+patience=3"), batch_size=16)
    defaults, epochs, select, ema, no_stop, short = (c.model_dump() for c in calls["cfg"])
    # the defaults: the clock alone ends the run
    assert (defaults["max_minutes"], defaults["epochs"], defaults["patience"]) == (8.0, 200, 1000)
    # epochs=30: `train`'s own budget, its early stopping included, and no clock
    assert {k: v for k, v in epochs.items() if defaults[k] != v} == {"max_minutes": None, "epochs": 30,
                                                                     "patience": TrainConfig().patience}
    assert {k: v for k, v in select.items() if defaults[k] != v} == {"select": "worst_source_auc"}
    assert {k: v for k, v in ema.items() if defaults[k] != v} == {"weight_average": "ema"}
    # epochs joined to patience: off runs every epoch (the schedule anneals to the last), N stops after N
    assert {k: v for k, v in no_stop.items() if defaults[k] != v} == {"max_minutes": None, "epochs": 30}
    assert no_stop["patience"] >= 30
    assert {k: v for k, v in short.items() if defaults[k] != v} == {"max_minutes": None, "epochs": 12, "patience": 3}


def test_match_steps_stops_every_training_lever_at_the_defaults_step_and_leaves_the_rest_alone(tmp_path,
                                                                                              monkeypatch):
    from melanogan.bench.ledger import ledger_table

    calls = _fake_pipeline(tmp_path, monkeypatch)
    result = travel.run(tmp_path, holdout=("derm7pt",), vary=("augment=strong", "resize_mode=lesion", "tta=2"),
                        batch_size=16, seed=3, repeats=2, match_steps=True)
    # per seed: the defaults on the clock, then the two training levers at the defaults' steps of that seed;
    # TTA rescores the defaults' model (no training of its own)
    budgets = [(c.seed, c.max_minutes, c.max_steps, c.epochs) for c in calls["cfg"]]
    assert budgets == [(3, 8.0, None, 200), (3, None, 103, 200), (3, None, 103, 200),
                       (1003, 8.0, None, 200), (1003, None, 1103, 200), (1003, None, 1103, 200)]
    assert all(c.patience >= 200 for c in calls["cfg"])  # no early stopping: the steps are the budget
    lever = calls["cfg"][1].model_dump()
    assert {k: v for k, v in lever.items() if calls["cfg"][0].model_dump()[k] != v} == {
        "augment": "strong", "max_minutes": None, "max_steps": 103}
    assert [r["steps"] for r in result["rows"]] == [103, 103, 103, 103, 1103, 1103, 1103, 1103]
    assert result["match_steps"] is True
    # the table puts each run's steps, minutes and speed beside its epochs; the ledger names the budget
    assert "| augment=strong (seed 3) | 3 (103 steps, " in travel.table(result)
    assert "| augment=strong (the defaults' steps) |" in ledger_table({"x.json": result})
    without = travel.run(tmp_path, holdout=("derm7pt",), vary=("augment=strong",), batch_size=16, seed=5)
    assert without["match_steps"] is False and calls["cfg"][-1].max_steps is None
    assert "steps" not in travel.table(without) and "(the defaults' steps)" not in ledger_table({"y.json": without})
    for budget in ("minutes=4", "epochs=30+patience=off", "ensemble=2"):
        with pytest.raises(MelanoganError, match="changes the budget itself"):
            travel.run(tmp_path, holdout=("derm7pt",), vary=("augment=strong", budget), match_steps=True)


def test_the_adapt_lever_adapts_the_defaults_model_on_the_choose_part_and_reports_on_the_other(tmp_path,
                                                                                              monkeypatch):
    import melanogan.classify.calibrate as cal
    from melanogan.classify import metrics as M

    calls = _fake_pipeline(tmp_path, monkeypatch)
    adapted = []

    def fake_calibrate(run_dir, data_dir, name, split="all", adapt_batchnorm=False, adapt_layers=None,
                       refit_head=None):
        calls["calibrate"].append((Path(run_dir).name, Path(data_dir).name, name, split, adapt_batchnorm,
                                   adapt_layers, refit_head))
        return {"n_images": 30, "temperature": 2.0, "thresholds": {"val-youden": 0.6}}

    logits = np.random.default_rng(9).normal(size=N_REPORT) + 3.0 * LABEL  # better separated than the defaults

    def fake_report(run_dir, site_dir, name):
        adapted.append((Path(run_dir).name, Path(site_dir).name, name))
        preds = pd.DataFrame({"uid": [f"u{i}" for i in range(N_REPORT)], "label": LABEL,
                              "group": [f"g{i}" for i in range(N_REPORT)], "logit": logits})
        return {"roc_auc": roc_auc_score(LABEL, logits), "roc_auc_ci95": [0.8, 1.0], "n_images": N_REPORT,
                "n_melanoma": 20, "excluded_overlap": 0}, preds

    monkeypatch.setattr(cal, "calibrate_site", fake_calibrate)
    monkeypatch.setattr(travel, "_adapted_report", fake_report)
    result = travel.run(tmp_path, holdout=("derm7pt",),
                        vary=("adapt=batchnorm", "adapt=batchnorm+adapt_layers=3", "adapt=head"), batch_size=16)
    assert len(calls["train"]) == 1  # the levers train nothing: they adapt the defaults' model
    run_dir = calls["evaluate"][0][0]
    site = "site-derm7pt-" + calls["prepare"][1][0].removeprefix("site-derm7pt-")
    # adapted on the choose part (split "train"), never on the report part it is scored on; the shallow
    # variant asks for its 3 layers under a site name of its own
    shallow = f"{travel.ADAPTED_SITE}-3"
    assert calls["calibrate"] == [(run_dir, site, "choose", "train", False, None, False),
                                  (run_dir, site, travel.ADAPTED_SITE, "train", True, None, False),
                                  (run_dir, site, shallow, "train", True, 3, False),
                                  (run_dir, site, travel.REFIT_SITE, "train", False, None, True)]
    assert adapted == [(run_dir, site, travel.ADAPTED_SITE), (run_dir, site, shallow),
                       (run_dir, site, travel.REFIT_SITE)]
    assert len(calls["evaluate"]) == 5  # defaults: internal + report; each lever: internal only
    row = {r["variant"]: r for r in result["rows"]}["adapt=batchnorm"]
    assert row["validation_threshold"] is None  # the unadapted model's threshold is not the adapted one's
    expected = M.confusion_at(LABEL, M.sigmoid(logits / 2.0), 0.6)  # the adapted calibration's threshold
    assert row["site_threshold"]["sensitivity"] == expected["sensitivity"]
    assert row["site_threshold"]["specificity"] == expected["specificity"]
    assert row["external_auc"] == pytest.approx(roc_auc_score(LABEL, logits), abs=1e-4)
    assert row["vs_defaults"]["difference"] > 0 and row["epochs"] == 3


def test_the_optimisers_settings_are_levers_that_change_their_own_value_only(tmp_path, monkeypatch):
    calls = _fake_pipeline(tmp_path, monkeypatch)
    travel.run(tmp_path, holdout=("derm7pt",), vary=("weight_decay=0.05", "lr=5e-3"), seed=3, batch_size=16,
               match_steps=True)
    base = calls["cfg"][0].model_dump()
    assert [{k: v for k, v in c.model_dump().items() if base[k] != v} for c in calls["cfg"][1:]] == [
        {"weight_decay": 0.05, "max_minutes": None, "max_steps": 103},
        {"lr": 0.005, "max_minutes": None, "max_steps": 103}]


def test_a_variant_of_the_defaults_own_settings_is_recorded_as_a_control_and_trains_its_own_model(tmp_path,
                                                                                                monkeypatch):
    defaults = {"minutes": 8.0, "image_size": 96, "tta": 1, "adapt": "none", "ensemble": 1, "gan": 0}
    for settings, control in [({"augment": "classic"}, True), ({"color_constancy": True}, True),
                              ({"model": "small-cnn"}, True), ({"image_size": 96, "mixup": 0.0}, True),
                              ({"augment": "strong"}, False), ({"augment": "classic", "mixup": 0.2}, False),
                              ({"model": "small-cnn-ibn"}, False), ({"image_size": 128}, False),
                              ({"color_constancy": False}, False), ({"tta": 8}, False),
                              ({"weight_decay": 1e-4}, True), ({"lr": 2e-3}, True), ({"weight_decay": 0.05}, False),
                              ({"lr": 5e-3}, False)]:
        assert travel.is_control(settings, defaults, "small-cnn") is control, settings
    calls = _fake_pipeline(tmp_path, monkeypatch)
    result = travel.run(tmp_path, holdout=("derm7pt",), vary=("augment=classic", "augment=strong"), seed=3,
                        batch_size=16, match_steps=True)
    assert result["controls"] == ["augment=classic"]
    # the control trains a model of its own, at the defaults' steps, with the defaults' settings
    assert len(calls["cfg"]) == 3
    assert {k: v for k, v in calls["cfg"][1].model_dump().items() if calls["cfg"][0].model_dump()[k] != v} == {
        "max_minutes": None, "max_steps": 103}
    assert "| augment=classic (control) | 3 (103 steps, " in travel.table(result)
    assert "| augment=strong | 3 (103 steps, " in travel.table(result)
    # on the clock too, and for a setting of the bench's own (the input size) as much as of train's: a run
    # of its own, not the defaults' model again (whose difference would be exactly 0)
    on_clock = travel.run(tmp_path, holdout=("derm7pt",), vary=("augment=classic", "image_size=96"), seed=4,
                          batch_size=16)
    assert on_clock["controls"] == ["augment=classic", "image_size=96"]
    assert len(calls["cfg"]) == 6 and all(c.max_minutes == 8.0 for c in calls["cfg"][3:])
    assert all(r["vs_defaults"]["difference"] != 0 for r in on_clock["rows"][1:])


def test_the_table_shows_each_row_with_its_paired_difference():
    row = {"held_out": "derm7pt", "report_images": 1505, "report_melanoma": 126, "epochs": 16,
           "internal_test_auc": 0.8694, "external_auc": 0.7403, "external_auc_ci95": [0.6842, 0.7881],
           "validation_threshold": {"sensitivity": 0.94, "specificity": 0.176}, "site_threshold": None}
    lever = {**row, "variant": "resize_mode=lesion", "external_auc": 0.7512, "internal_test_auc_ci95": [0.8412, 0.8951],
             "vs_defaults": {"difference": 0.0109, "ci95": [-0.004, 0.0261], "p_value": 0.151, "p_holm": 0.453}}
    lines = travel.table({"rows": [{**row, "variant": "defaults"}, lever]}).splitlines()
    assert lines[2] == ("| Derm7pt (1,505 images, 126 mel) | defaults | 16 | 0.869 | 0.740 [0.684, 0.788] | - | "
                        "0.94 / 0.18 | - |")
    assert ("| resize_mode=lesion | 16 | 0.869 [0.841, 0.895] | 0.751 [0.684, 0.788] "
            "| +0.011 [-0.004, +0.026] (0.151, 0.453) |") in lines[3]
    assert len(lines) == 4 and lines[0].count("|") == lines[1].count("|") == lines[2].count("|")


def test_the_diagnosis_lines_put_each_lever_beside_the_defaults_per_benign_diagnosis():
    def dx(auc_nevus, auc_sk, called=None, ci=None):
        return [{"diagnosis": "melanoma", "melanoma": True, "n_images": 30, "called_melanoma": called,
                 "roc_auc_vs_melanoma": None, "roc_auc_vs_melanoma_ci95": None},
                {"diagnosis": "nevus", "melanoma": False, "n_images": 200, "called_melanoma": called,
                 "roc_auc_vs_melanoma": auc_nevus, "roc_auc_vs_melanoma_ci95": ci},
                {"diagnosis": "seborrheic keratosis", "melanoma": False, "n_images": 4, "called_melanoma": called,
                 "roc_auc_vs_melanoma": auc_sk, "roc_auc_vs_melanoma_ci95": ci and [None, None]}]

    rows = [{"held_out": "isic9", "variant": "defaults", "report_by_diagnosis": dx(0.8123, None, 0.25, [0.75, 0.86])},
            {"held_out": "isic9", "variant": "mixup=0.2", "report_by_diagnosis": dx(0.7, None)},
            {"held_out": "isic9", "variant": "tta=8", "repeat": 1, "report_by_diagnosis": dx(0.1, None)},
            {"held_out": "derm7pt", "variant": "defaults"}]  # a row saved before the table was kept
    lines = travel.diagnosis_lines({"rows": rows}).splitlines()
    assert lines[0].endswith("| mixup=0.2 |") and "tta=8" not in lines[0]  # a second seed's row is not shown
    assert lines[2:] == ["| ISIC 9-class | nevus | 200 | 0.812 [0.750, 0.860] | 25% | 0.700 |",
                         "| ISIC 9-class | seborrheic keratosis | 4 | - | 25% | - |"]
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert travel.diagnosis_lines({"rows": rows[3:]}) == ""


def test_the_command_prints_the_table_and_keeps_the_json(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from melanogan.cli import app

    row = {"held_out": "isic9", "variant": "defaults", "report_images": 683, "report_melanoma": 187, "epochs": 18,
           "internal_test_auc": 0.879, "external_auc": 0.736, "external_auc_ci95": [0.695, 0.772],
           "validation_threshold": None, "site_threshold": None}
    seen = {}

    lever = {**row, "variant": "tta=8", "external_auc": 0.740,
             "vs_defaults": {"difference": 0.004, "ci95": [-0.01, 0.02], "p_value": 0.5, "p_holm": 0.5}}

    def fake_run(*args):
        seen["args"] = args
        return {"rows": [row, lever], "levers": ["tta=8"]}

    monkeypatch.setattr(travel, "run", fake_run)
    result = CliRunner().invoke(app, ["bench", "travel", "--holdout", "isic9", "--vary", "tta=8", "--vary",
                                      "augment=strong", "--json", str(tmp_path / "t.json")])
    assert result.exit_code == 0, result.output
    assert "| ISIC 9-class (683 images, 187 mel) | defaults | 18 | 0.879 | 0.736 [0.695, 0.772] | - | - | - |" \
        in result.output
    assert seen["args"][2] == ("isic9",) and seen["args"][8] == ("tta=8", "augment=strong")
    assert json.loads((tmp_path / "t.json").read_text()) == {"rows": [row, lever], "levers": ["tta=8"]}
    # the verdict by the decision rule, last: positive here, but only one source held out
    assert "tta=8: undecided by the rule (Derm7pt, HAM10000 not held out)" in result.output
    assert "confuses with melanoma" not in result.output  # rows saved before the per-diagnosis table
    nevi = {"diagnosis": "nevus", "melanoma": False, "n_images": 400, "called_melanoma": 0.2,
            "roc_auc_vs_melanoma": 0.91, "roc_auc_vs_melanoma_ci95": [0.88, 0.94]}
    row["report_by_diagnosis"] = [nevi]
    result = CliRunner().invoke(app, ["bench", "travel", "--holdout", "isic9", "--vary", "tta=8"])
    assert "| ISIC 9-class | nevus | 400 | 0.910 [0.880, 0.940] | 20% |\n" in result.output
    assert "training sources' case mix" not in result.output  # a row without its case mix
    row["case_mix"] = {"training_mix": {"nevus": 0.8, "benign keratosis": 0.2}, "training_mix_covered": 0.95,
                       "report_mix": {"benign keratosis": 0.3, "nevus": 0.6, "dermatofibroma": 0.1},
                       "external_auc_at_training_mix": 0.8123, "ci95": [0.78, 0.84]}
    result = CliRunner().invoke(app, ["bench", "travel", "--holdout", "isic9", "--vary", "tta=8"])
    assert ("| ISIC 9-class | defaults | 0.736 | 0.812 [0.780, 0.840] (95%) | nevus 60%, benign keratosis 30%, "
            "dermatofibroma 10% | nevus 80%, benign keratosis 20% |") in result.output
    # a bootstrap with too few resamples of both classes has no CI (null in the JSON): said, not a crash
    row["case_mix"]["ci95"] = [None, None]
    result = CliRunner().invoke(app, ["bench", "travel", "--holdout", "isic9", "--vary", "tta=8"])
    assert result.exit_code == 0 and "| 0.812 [CI n/a] (95%) |" in result.output


def test_repeats_train_every_variant_per_seed_on_the_same_split_and_pool_the_comparison(tmp_path, monkeypatch):
    calls = _fake_pipeline(tmp_path, monkeypatch)
    result = travel.run(tmp_path, holdout=("derm7pt",), vary=("augment=strong", "ensemble=2"), batch_size=16,
                        seed=3, repeats=2)
    assert len(calls["prepare"]) == 2  # one split (train + site), shared by both seeds
    # per seed: defaults, strong, the ensemble's two members
    assert [c.seed for c in calls["cfg"]] == [3, 3, 3, 4, 1003, 1003, 1003, 1004]
    assert result["train_seeds"] == [3, 1003]
    rows = result["rows"]
    assert [(r["variant"], r["train_seed"]) for r in rows] == [
        ("defaults", 3), ("augment=strong", 3), ("ensemble=2", 3),
        ("defaults", 1003), ("augment=strong", 1003), ("ensemble=2", 1003)]
    combined = {c["variant"]: c for c in result["combined"]}
    strong = combined["augment=strong"]
    per_seed = [r["vs_defaults"]["difference"] for r in rows if r["variant"] == "augment=strong"]
    assert strong["per_seed_differences"] == per_seed and per_seed[0] != per_seed[1]
    assert strong["difference"] == pytest.approx(np.mean(per_seed), abs=1e-4)  # the mean of the seeds' differences
    assert strong["difference"] > 0 and strong["p_holm"] >= strong["p_value"]
    text = travel.table(result)
    assert "| Derm7pt (60 images, 20 mel) | augment=strong (seed 1003) |" in text
    assert f"| Derm7pt | augment=strong | {strong['difference']:+.3f} [" in text
    assert f"| {per_seed[0]:+.3f}, {per_seed[1]:+.3f} |" in text
    with pytest.raises(MelanoganError, match="--repeats 0"):
        travel.run(tmp_path, holdout=("derm7pt",), repeats=0)


def test_pooled_difference_is_the_mean_over_seeds_on_images_all_runs_scored():
    rng = np.random.default_rng(1)
    n = 120
    label = np.r_[np.ones(30, int), np.zeros(n - 30, int)]
    base = pd.DataFrame({"uid": [f"u{i}" for i in range(n)], "label": label, "group": [f"g{i}" for i in range(n)]})
    runs = [base.assign(logit=rng.normal(size=n) + s * label) for s in (0.5, 0.8, 1.5, 1.0)]
    pooled = _paired(runs[:2], [runs[2], runs[3].iloc[1:]])  # one image missing from one run
    kept = base["uid"] != "u0"
    def auc(i: int) -> float:
        return roc_auc_score(label[kept], runs[i]["logit"][kept])

    expected = np.mean([auc(2) - auc(0), auc(3) - auc(1)])
    assert pooled["images"] == n - 1 and pooled["difference"] == pytest.approx(expected, abs=1e-4)
    assert pooled["ci95"][0] < pooled["difference"] < pooled["ci95"][1]


def test_the_gan_lever_trains_one_gan_on_the_training_sources_and_adds_both_classes(tmp_path, monkeypatch):
    """The GAN sees the training sources' data dir (never the held-out site's), each class gets N
    synthetic images, the classifier differs from the defaults by its synthetic set only, and two
    counts from one GAN train it once."""
    import melanogan.gan.evaluate as gan_evaluate
    import melanogan.gan.sample as sample
    import melanogan.gan.train as gan_train

    calls = _fake_pipeline(tmp_path, monkeypatch)
    gans, generated = [], []

    def fake_train_gan(data_dir, run_dir, cfg, accelerator="auto", progress=True):
        gans.append((Path(data_dir).name, cfg))
        Path(run_dir).mkdir(parents=True)
        (Path(run_dir) / "run.json").write_text('{"training_images": {"melanoma": 5, "other": 20}}')
        return {"step": cfg.steps, "training_images": {"melanoma": 5, "other": 20}}

    def fake_generate(run_dir, n, label, out, seed=0):
        generated.append((Path(run_dir).name, n, label, Path(out).name, seed))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "prepare.json").write_text('{"generator": "ema"}')

    monkeypatch.setattr(gan_train, "train_gan", fake_train_gan)
    monkeypatch.setattr(sample, "generate", fake_generate)
    monkeypatch.setattr(gan_evaluate, "label_effect_of", lambda syn_dir: {"ratio": 0.25, "pairs": 2})
    result = travel.run(tmp_path, holdout=("derm7pt",),
                        vary=("gan=10", "gan=20", "gan=10+gan_steps=5+gan_preset=default"), batch_size=16, seed=3)
    train_dir = calls["train"][0][0]
    assert [(d, c.steps, c.resolution, c.generator_channels, c.critic_channels, c.lr, c.ema_decay, c.seed)
            for d, c in gans] == [(train_dir, 600, 64, 128, 32, 2e-4, 0.995, 3),  # the cpu preset, the defaults' data
                                  (train_dir, 5, 64, 256, 64, 1e-4, 0.999, 3)]  # the shipped preset as it is
    first, second = (f"gan-derm7pt-{i}" for i in (1, 4))  # named by how many runs the held-out source had made
    assert generated == [(gan, n, label, f"{gan}-synthetic-{n}", 3)
                         for gan, n in ((first, 10), (first, 20), (second, 10)) for label in ("melanoma", "other")]
    defaults = calls["cfg"][0].model_dump()
    for cfg, syn in zip(calls["cfg"][1:], (f"{first}-synthetic-10", f"{first}-synthetic-20", f"{second}-synthetic-10"),
                        strict=True):
        changed = {k: v for k, v in cfg.model_dump().items() if defaults[k] != v}
        assert list(changed) == ["synthetic"] and [Path(x).name for x in changed["synthetic"]] == [syn]
    rows = {r["variant"]: r for r in result["rows"]}
    assert "gan" not in rows["defaults"]
    assert rows["gan=20"]["gan"]["synthetic_per_class"] == 20 and rows["gan=20"]["gan"]["steps"] == 600
    assert rows["gan=10+gan_steps=5+gan_preset=default"]["gan"]["preset"] == "default"
    assert rows["gan=20"]["gan"]["training_images"] == {"melanoma": 5, "other": 20}
    assert rows["gan=20"]["gan"]["diverged"] is None
    assert "(GAN: 600 steps at 64 px, 0.0 min, label/noise effect 0.25)" in travel.table(result)


def test_a_diverged_gan_draws_from_its_last_good_checkpoint_and_the_row_says_so(tmp_path, monkeypatch):
    import melanogan.gan.evaluate as gan_evaluate
    import melanogan.gan.sample as sample
    import melanogan.gan.train as gan_train

    calls = _fake_pipeline(tmp_path, monkeypatch)
    drawn_from = []

    def diverging(data_dir, run_dir, cfg, accelerator="auto", progress=True):
        Path(run_dir).mkdir(parents=True)
        (Path(run_dir) / "run.json").write_text('{"training_images": {"melanoma": 5, "other": 20}}')
        if cfg.steps > 100:  # a checkpoint at step 150 (of checkpoint_every = steps // 4), then NaN losses
            (Path(run_dir) / "checkpoints" / "step-0000150").mkdir(parents=True)
            (Path(run_dir) / "checkpoints" / "step-0000150" / "state.json").write_text('{"step": 150}')
        raise gan_train.GanDivergedError("training diverged at step 170: critic_loss=nan")

    def fake_generate(run_dir, n, label, out, seed=0):
        drawn_from.append((Path(run_dir).name, label))  # generate's own default: the latest good checkpoint
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "prepare.json").write_text('{"generator": "raw"}')

    monkeypatch.setattr(gan_train, "train_gan", diverging)
    monkeypatch.setattr(sample, "generate", fake_generate)
    monkeypatch.setattr(gan_evaluate, "label_effect_of", lambda syn_dir: None)
    result = travel.run(tmp_path, holdout=("derm7pt",), vary=("gan=10",), batch_size=16)
    row = {r["variant"]: r for r in result["rows"]}["gan=10"]
    assert row["gan"]["steps"] == 150 and "diverged at step 170" in row["gan"]["diverged"]
    assert drawn_from == [("gan-derm7pt-1", "melanoma"), ("gan-derm7pt-1", "other")] and len(calls["cfg"]) == 2
    assert "diverged: images from its last good checkpoint" in travel.table(result)
    # diverged before any checkpoint: nothing to draw from, a message that says what to do
    with pytest.raises(MelanoganError, match="derm7pt held out: the gan lever's GAN diverged before its first"):
        travel.run(tmp_path, holdout=("derm7pt",), vary=("gan=10+gan_steps=40",), batch_size=16)


def test_the_gan_lever_makes_a_synthetic_set_the_classifier_accepts(demo_prepared, tmp_path):
    """The real GAN and generator, a few steps: N images of each class, training rows only, in the
    training data's preprocessing (what train_classifier checks before it uses them)."""
    from melanogan.classify.train import check_synthetic_manifest
    from melanogan.data.manifest import default_cache
    from melanogan.data.synthetic import check_synthetic_space

    settings = {**travel.GAN_DEFAULTS, "gan": 3, "gan_steps": 2, "gan_resolution": 32}
    trained: dict = {}
    made = travel._synthetic(demo_prepared, tmp_path, "derm7pt", "key", settings, 7, "cpu", trained)
    manifest = check_synthetic_manifest(Path(made["syn_dir"]))
    assert manifest["label"].value_counts().to_dict() == {1: 3, 0: 3}
    check_synthetic_space(Path(made["syn_dir"]), default_cache(demo_prepared).options)
    assert made["steps"] == 2 and made["resolution"] == 32 and made["synthetic_per_class"] == 3
    assert made["label_effect"]["pairs"] == 3  # every melanoma has its noise twin among the others
    again = travel._synthetic(demo_prepared, tmp_path, "derm7pt", "key", {**settings, "gan": 2}, 7, "cpu", trained)
    assert len(trained) == 1 and again["syn_dir"] != made["syn_dir"]  # the same GAN, another set
    assert check_synthetic_manifest(Path(again["syn_dir"]))["label"].value_counts().to_dict() == {1: 2, 0: 2}

