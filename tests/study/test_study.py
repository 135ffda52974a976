"""The study end to end at toy size: report contents, leakage audit, resume."""

from __future__ import annotations

import pytest

from melanogan.classify.train import TrainConfig
from melanogan.errors import MelanoganError
from melanogan.study.experiments import (
    STUDY_OWNED,
    ClassifierOptions,
    GanOptions,
    StudyConfig,
    load_study_config,
    run_study,
    same_study_config,
)


def _toy(data) -> StudyConfig:
    return StudyConfig(
        data=str(data), arms=["baseline", "weighted-loss", "gan"], seeds=[0], n_synthetic=12, n_synthetic_other=4,
        bootstrap=50,
        classifier=ClassifierOptions(image_size=32, epochs=2, batch_size=8, workers=0),
        gan=GanOptions(overrides={"resolution": 32, "generator_channels": 32, "critic_channels": 8, "n_critic": 1,
                                  "steps": 2, "batch_size": 8, "checkpoint_every": 2, "sample_every": 2,
                                  "log_every": 1}),
    )


def test_toy_study_report_and_resume(demo_prepared, tmp_path):
    logs: list[str] = []
    report = run_study(_toy(demo_prepared), tmp_path / "study", log=logs.append, progress=False)
    text = report.read_text()
    for heading in ("The original study's table (threshold 0.5)", "The honest table", "Versus baseline",
                    "Leakage audit", "Provenance"):
        assert f"## {heading}" in text
    assert "| weighted-loss |" in text and "| gan |" in text
    # the report's verdict column is the one the statistics give for these predictions
    from melanogan.study.report import collect
    from melanogan.study.stats import compare_with_baseline

    cfg = _toy(demo_prepared)
    rows = compare_with_baseline(cfg.arms, cfg.seeds, collect(tmp_path / "study", cfg)[1], n_bootstrap=cfg.bootstrap)
    from melanogan.results import StudyResult

    table = StudyResult(tmp_path / "study", report).table  # what melanogan.study() returns, as data
    assert list(table["arm"]) == [r["arm"] for r in rows] and list(table["verdict"]) == [r["verdict"] for r in rows]
    assert [r["arm"] for r in rows] == ["weighted-loss", "gan"]
    from PIL import Image

    grid = Image.open(tmp_path / "study" / "figures" / "synthetic.png")  # real vs synthetic, both classes
    assert grid.size[1] == 4 * 98 and "real and synthetic, per class" in text
    for r in rows:
        assert r["verdict"] in text and f"| {r['arm']} | {r['difference']:+.3f} |" in text
    assert "## Oracle operating points (not validation-chosen)" in text
    # resolution: matched by default with a gan arm: real training rows of every arm took the 32 px path
    import json

    from melanogan.data.manifest import load_manifest

    for arm in ("baseline", "weighted-loss", "gan"):
        saved = json.loads((tmp_path / "study" / "seed-0" / "arms" / arm / "best" / "state.json").read_text())
        assert saved["config"]["generator_resolution"] == 32, arm
    assert "## Resolution control" in text and "`resolution: matched`" in text
    probe = json.loads((tmp_path / "study" / "seed-0" / "arms" / "gan" / "shortcut_probe.json").read_text())
    assert probe["resolution"] == 32 and f"| gan | 0 | {probe['mean_before']:.3f} | {probe['mean_after']:.3f} |" in text
    assert not (tmp_path / "study" / "seed-0" / "arms" / "baseline" / "shortcut_probe.json").exists()
    counts = load_manifest(tmp_path / "study" / "seed-0" / "synthetic")["label"].value_counts().to_dict()
    assert counts == {1: 12, 0: 4}  # synthetic non-melanomas too: "synthetic" is no label proxy
    assert "GAN trained on the training split only | pass" in text
    assert "synthetic rows only in train | pass" in text and "FAIL" not in text
    assert "git commit" in text and "data manifest hash" in text
    html = (tmp_path / "study" / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html and "src=\"figures" not in html
    assert (tmp_path / "study" / "seed-0" / "arms" / "gan" / "run.json").is_file()
    assert (tmp_path / "study" / "seed-0" / "gan" / "checkpoints").is_dir()

    logs.clear()
    run_study(_toy(demo_prepared), tmp_path / "study", log=logs.append, progress=False)
    assert any("GAN already trained" in m for m in logs)
    assert sum("already done" in m for m in logs) == 3
    assert not any(m.startswith("seed 0: training") for m in logs)


def test_resolution_defaults_to_matched_with_a_gan_arm_and_its_cost_arm_needs_it(demo_prepared):
    assert StudyConfig(data=str(demo_prepared)).resolution == "matched"  # default arms include gan
    assert StudyConfig(data=str(demo_prepared), arms=["baseline", "oversample"]).resolution == "native"
    options, synthetic = StudyConfig(data=str(demo_prepared)).arm_options("baseline-native-res")
    assert options["generator_resolution"] is None and not synthetic
    with pytest.raises(ValueError, match="would train the same classifier"):  # no path to measure the cost of
        StudyConfig(data=str(demo_prepared), arms=["baseline", "gan", "baseline-native-res"], resolution="native")


def test_arms_that_train_the_same_classifier_are_refused(demo_prepared):
    with pytest.raises(ValueError, match="would train the same classifier"):  # classic aug is the default
        StudyConfig(data=str(demo_prepared), arms=["baseline", "classic-aug"])
    cfg = StudyConfig(data=str(demo_prepared), arms=["baseline", "classic-aug"],
                      classifier=ClassifierOptions(augment="none"))
    assert cfg.arms == ["baseline", "classic-aug"]


def test_the_study_classifier_takes_every_train_option_with_trains_defaults():
    # every TrainConfig field but the study's own, with the same default (a study's baseline is `train`'s)
    options, train = ClassifierOptions(), TrainConfig()
    assert set(ClassifierOptions.model_fields) == set(TrainConfig.model_fields) - set(STUDY_OWNED)
    assert all(getattr(options, k) == getattr(train, k) for k in ClassifierOptions.model_fields)
    # an option the old hand-written list lacked reaches every arm, beside what the arm changes
    cfg = StudyConfig(data="x", arms=["baseline", "weighted-loss"],
                      classifier={"mixup": 0.2, "color_augment": "lab", "select": "worst_source_auc"})
    for arm, loss in (("baseline", "bce"), ("weighted-loss", "weighted")):
        built = TrainConfig(**cfg.arm_options(arm)[0])
        assert (built.mixup, built.color_augment, built.select, built.loss) == (0.2, "lab", "worst_source_auc", loss)
    with pytest.raises(ValueError, match="seed"):  # the study's own fields are not classifier options
        ClassifierOptions(seed=3)


def test_a_classifier_option_train_would_refuse_is_refused_when_the_study_config_is_read(tmp_path):
    (tmp_path / "s.yaml").write_text("data: x\narms: [baseline]\nclassifier: {augment: none, color_augment: lab}\n")
    with pytest.raises(MelanoganError, match=r"arm 'baseline'.*color_augment 'lab' is the colour step"):
        load_study_config(tmp_path / "s.yaml")
    (tmp_path / "t.yaml").write_text("data: x\narms: [baseline]\nclassifier: {mixup: 20}\n")
    with pytest.raises(MelanoganError, match="mixup"):  # TrainConfig's bound (<= 10) holds here too
        load_study_config(tmp_path / "t.yaml")


def test_a_study_saved_before_an_option_existed_still_resumes_and_a_changed_one_does_not():
    cfg = StudyConfig(data="x", arms=["baseline", "oversample"], classifier={"image_size": 64})
    saved = cfg.model_dump(mode="json")
    for key in ("mixup", "color_augment", "diagnosis_vocabulary"):  # written before these existed
        del saved["classifier"][key]
    assert same_study_config(saved, cfg)
    assert not same_study_config({**saved, "classifier": {**saved["classifier"], "mixup": 0.2}}, cfg)
    assert not same_study_config({**saved, "classifier": {**saved["classifier"], "image_size": 96}}, cfg)
    assert not same_study_config({"data": "x", "arms": ["magic"]}, cfg)  # unreadable: differs
    assert not same_study_config(None, cfg)


def test_study_config_errors(tmp_path, demo_prepared):
    (tmp_path / "s.yaml").write_text("data: x\narms: [baseline, magic]\n")
    with pytest.raises(MelanoganError, match="unknown arm"):
        load_study_config(tmp_path / "s.yaml")
    (tmp_path / "t.yaml").write_text("data: x\narms: [gan]\n")
    with pytest.raises(MelanoganError, match="must include 'baseline'"):
        load_study_config(tmp_path / "t.yaml")
    (tmp_path / "u.yaml").write_text(f"data: {demo_prepared}\narms: [baseline]\nseeds: [0]\n")
    cfg = load_study_config(tmp_path / "u.yaml")
    assert cfg.data == str(demo_prepared)
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "study.yaml").write_text("data: other\n")
    with pytest.raises(MelanoganError, match="different config"):
        run_study(cfg, tmp_path / "study", log=None)


def test_the_original_protocol_runs_beside_and_is_labelled_leaky(demo_prepared, tmp_path):
    import json

    from melanogan.data.manifest import load_manifest

    cfg = _toy(demo_prepared).model_copy(update={"arms": ["baseline", "gan"], "protocol": "both",
                                                 "n_synthetic_other": 0})
    text = run_study(cfg, tmp_path / "study", log=None, progress=False).read_text()
    original = tmp_path / "study" / "original-protocol"
    # split by image: the same patient/lesion group lands in several splits
    by_image = load_manifest(original / "data-by-image")
    real = load_manifest(demo_prepared)
    assert len(by_image) == int(real["label"].isin([0, 1]).sum())
    assert (by_image.groupby("group_id")["split"].nunique() > 1).any()
    assert (real.groupby("group_id")["split"].nunique() == 1).all()  # the honest split never does that
    # the GAN saw every melanoma, validation and test ones included
    run = json.loads((original / "seed-0" / "gan" / "run.json").read_text())
    assert run["trained_on_split"] == "train,val,test"
    assert run["training_images"]["melanoma"] == int((by_image["label"] == 1).sum())
    saved = json.loads((original / "seed-0" / "arms" / "baseline" / "best" / "state.json").read_text())["config"]
    assert (saved["model"], saved["image_size"], saved["augment"]) == ("original-cnn", 224, "none")
    # labelled as leaky wherever it appears
    leaky = (original / "report.md").read_text()
    assert leaky.startswith("# LEAKY") and "Leaky by design" in leaky
    assert "| FAIL |" in leaky and "trained on every melanoma of every split (LEAKY)" in leaky
    assert "## The original protocol beside this one" in text and "| original (LEAKY) | gan |" in text
    assert "| this study | baseline |" in text
    honest_audit = text.split("## Leakage audit")[1]
    assert "FAIL" not in honest_audit


def test_a_time_boxed_gan_pauses_the_gan_arms_and_resumes(demo_prepared, tmp_path):
    cfg = _toy(demo_prepared)
    cfg = cfg.model_copy(update={"arms": ["baseline", "gan"], "n_synthetic_other": 0,
                                 "gan": cfg.gan.model_copy(update={"max_steps_per_invocation": 1})})
    logs: list[str] = []
    run_study(cfg, tmp_path / "study", log=logs.append, progress=False)
    assert any("GAN paused at step 1 of 2" in m for m in logs)
    arms = tmp_path / "study" / "seed-0" / "arms"
    assert (arms / "baseline" / "eval-test" / "metrics.json").is_file() and not (arms / "gan").exists()
    logs.clear()
    run_study(cfg, tmp_path / "study", log=logs.append, progress=False)
    assert any("resuming at 1" in m for m in logs) and (arms / "gan" / "eval-test" / "metrics.json").is_file()


def test_one_gan_shared_across_seeds_feeds_every_seed(demo_prepared, tmp_path):
    cfg = _toy(demo_prepared)
    cfg = cfg.model_copy(update={"arms": ["baseline", "gan"], "seeds": [3, 4], "n_synthetic_other": 0,
                                 "gan": cfg.gan.model_copy(update={"shared_across_seeds": True})})
    report = run_study(cfg, tmp_path / "study", log=None, progress=False)
    study = tmp_path / "study"
    assert (study / "seed-3" / "gan").is_dir() and not (study / "seed-4" / "gan").exists()
    assert not (study / "seed-4" / "synthetic").exists()
    import yaml

    used = yaml.safe_load((study / "seed-4" / "arms" / "gan" / "config.yaml").read_text())["synthetic"]
    assert used == [str(study / "seed-3" / "synthetic")]
    assert "from one GAN (seed 3) shared by every seed" in report.read_text()


@pytest.mark.parametrize("name", ["shared-data.yaml", "shared-data-cpu.yaml"])
def test_the_shipped_shared_data_study_configs_are_valid(name):
    from pathlib import Path

    cfg = load_study_config(Path(__file__).parents[2] / "studies" / name)
    assert cfg.protocol == "both" and cfg.resolution == "matched" and len(cfg.seeds) >= 3
    assert {"baseline", "weighted-loss", "oversample", "classic-aug", "gan", "gan+classic-aug"} <= set(cfg.arms)
    assert cfg.n_synthetic >= 1000 and cfg.external


def test_a_gan_put_in_the_study_folder_must_match_the_data_and_settings(demo_prepared, tmp_path):
    """A GAN trained elsewhere (a GPU machine) and copied in is used only if it was trained on the
    study's data with the study's settings."""
    import json
    import shutil

    cfg = _toy(demo_prepared)
    cfg = cfg.model_copy(update={"arms": ["baseline", "gan"], "n_synthetic_other": 0})
    run_study(cfg, tmp_path / "study", log=None, progress=False)
    gan = tmp_path / "study" / "seed-0" / "gan"
    for name in ("wider", "other-data"):
        shutil.copytree(gan, tmp_path / name / "seed-0" / "gan")
    wider = cfg.model_copy(update={"gan": cfg.gan.model_copy(update={"overrides": {**cfg.gan.overrides,
                                                                                  "critic_channels": 16}})})
    with pytest.raises(MelanoganError, match="critic_channels: 8 vs 16"):
        run_study(wider, tmp_path / "wider", log=None, progress=False)
    run_json = tmp_path / "other-data" / "seed-0" / "gan" / "run.json"
    run_json.write_text(json.dumps({**json.loads(run_json.read_text()), "manifest_hash": "0" * 16}))
    with pytest.raises(MelanoganError, match="trained on data with manifest hash 0000000000000000"):
        run_study(cfg, tmp_path / "other-data", log=None, progress=False)


def test_the_shipped_gpu_study_config_is_the_128px_gan_variant():
    from pathlib import Path

    cfg = load_study_config(Path(__file__).parents[2] / "studies" / "shared-data-gpu.yaml")
    assert cfg.gan_resolution == 128 and cfg.resolution == "matched" and len(cfg.seeds) >= 3
    assert {"baseline", "gan"} <= set(cfg.arms) and cfg.n_synthetic >= 1000 and cfg.external
