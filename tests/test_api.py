"""The Python API against its CLI twins on the demo data: same files, same numbers; result objects
show what they hold."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

import melanogan as mg
from melanogan.cli import app
from melanogan.errors import MelanoganError

runner = CliRunner()


def _cli(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def api_run(demo_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    return mg.train(demo_prepared, out, image_size=32, epochs=2, batch_size=8, workers=0, progress=False)


def test_prepare_and_audit_match_the_cli(demo_raw, tmp_path):
    data = mg.prepare([f"siim-isic-2020={demo_raw}"], tmp_path / "api", size=32, progress=False)
    _cli("prepare", "--source", f"siim-isic-2020={demo_raw}", "--out", tmp_path / "cli", "--size", 32)
    cli_manifest = pd.read_parquet(tmp_path / "cli" / "manifest.parquet")
    api_manifest = pd.read_parquet(data.data_dir / "manifest.parquet")
    pd.testing.assert_frame_equal(api_manifest.drop(columns="path"), cli_manifest.drop(columns="path"))
    assert list(data.manifest["uid"]) == list(api_manifest["uid"])
    assert data.summary["kept"].sum() == len(cli_manifest) and f"{len(cli_manifest)} images kept" in repr(data)
    report = mg.audit(data.data_dir)
    assert report.passed and "passed" in repr(report) and "<table" in report._repr_html_()
    _cli("audit", tmp_path / "cli", "--json", tmp_path / "audit.json")
    assert json.loads((tmp_path / "audit.json").read_text())["checks"] == \
        json.loads(json.dumps(mg.audit(tmp_path / "cli").as_dict["checks"]))


def test_train_evaluate_predict_explain_export_match_the_cli(api_run, demo_raw, tmp_path):
    assert api_run.summary["epochs"] == 2 and "best validation AUC" in repr(api_run)
    assert list(api_run.stats["epoch"]) == [1, 2]
    ev = mg.evaluate(api_run.run_dir, bootstrap=50, out=tmp_path / "ev-api", log=None)
    _cli("evaluate", api_run.run_dir, "--bootstrap", 50, "--out", tmp_path / "ev-cli")
    cli_metrics = json.loads((tmp_path / "ev-cli" / "metrics.json").read_text())
    assert cli_metrics["roc_auc"] == ev.metrics["roc_auc"] and cli_metrics["roc_auc_ci95"] == ev.metrics["roc_auc_ci95"]
    assert cli_metrics["thresholds"] == ev.metrics["thresholds"]
    pd.testing.assert_frame_equal(ev.predictions, pd.read_csv(tmp_path / "ev-cli" / "predictions.csv"))
    pd.testing.assert_frame_equal(ev.diagnoses, pd.read_csv(tmp_path / "ev-cli" / "diagnoses.csv"))
    assert f"ROC-AUC {ev.metrics['roc_auc']:.3f}" in repr(ev) and len(ev.subgroups) > 0
    assert ev.plot().axes and "<img" in ev._repr_html_()

    images = sorted((demo_raw / "jpeg" / "train").glob("*.jpg"))[:3]
    preds = mg.predict(api_run.run_dir, images, progress=False, log=None)
    _cli("predict", api_run.run_dir, *images, "--out", tmp_path / "p.csv")
    pd.testing.assert_frame_equal(preds.table, pd.read_csv(tmp_path / "p.csv", keep_default_na=False,
                                                           dtype={"error": str}), check_dtype=False)
    assert "3 scored" in repr(preds)

    heat = mg.explain(api_run.run_dir, images[0], tmp_path / "h.png")
    out = _cli("explain", api_run.run_dir, images[0], "--out", tmp_path / "h-cli.png")
    assert f"melanoma probability {heat.probability:.3f}" in " ".join(out.split()) and heat.plot().axes

    exported = mg.export(api_run.run_dir, "torchscript", tmp_path / "m.pt")
    assert exported.file.is_file() and exported.sidecar["max_abs_difference_vs_pytorch"] < 1e-4


def test_gan_generate_and_quality_through_the_api(demo_prepared, tmp_path):
    gan = mg.train_gan(demo_prepared, tmp_path / "gan", resolution=32, steps=2, batch_size=8, checkpoint_every=2,
                       sample_every=2, log_every=1, progress=False)
    assert gan.finished and gan.step == 2 and len(gan.stats) == 2 and gan.plot().axes
    syn = mg.generate(gan.run_dir, tmp_path / "syn", n=6)
    assert len(syn.manifest) == 6 and syn.grid(4).shape[2] == 3 and "6 melanoma" in repr(syn)
    quality = mg.evaluate_gan(syn.syn_dir, demo_prepared, tmp_path / "q", pairs=5)
    assert quality.summary["score"].str.contains("melanoma FID").any()
    on_disk = json.loads((tmp_path / "q" / "quality.json").read_text())  # NaN != NaN: compare as JSON text
    assert json.dumps(quality.result, sort_keys=True) == json.dumps(on_disk, sort_keys=True)


def test_errors_are_raised_not_printed(tmp_path):
    with pytest.raises(MelanoganError, match=r"manifest\.parquet: not found"):
        mg.audit(tmp_path / "nothing")
    with pytest.raises(MelanoganError, match="invalid training options"):
        mg.train(tmp_path, tmp_path / "run", loss="nope", progress=False)
