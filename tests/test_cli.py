"""The command line as a user meets it: help texts, the demo flow, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from melanogan.cli import app

runner = CliRunner()
COMMANDS = ["demo-data", "prepare", "audit", "demo", "train-gan", "generate", "evaluate-gan", "train", "evaluate",
            "study", "predict", "explain", "export", "serve", "bench preprocess", "bench gan", "bench classifier",
            "bench quality", "bench serve"]


def test_root_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("demo-data", "prepare", "audit", "demo", "bench"):
        assert name in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself(command):
    result = runner.invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0
    assert "--" in result.output and len(result.output) > 300


def test_demo_data_prepare_audit(tmp_path):
    raw, data = tmp_path / "raw", tmp_path / "data"
    r = runner.invoke(app, ["demo-data", "--out", str(raw), "--n-images", "30", "--width", "64", "--height", "48"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["prepare", "--source", f"siim-isic-2020={raw}", "--out", str(data), "--size", "32",
                            "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "kept" in r.output and (data / "manifest.parquet").is_file()
    r = runner.invoke(app, ["audit", str(data), "--json", str(tmp_path / "audit.json")])
    assert r.exit_code == 0, r.output
    assert "pass" in r.output and (tmp_path / "audit.json").is_file()


def test_user_errors_exit_2_with_a_message_not_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "melanogan.cli", "prepare", "--source",
                           f"ham10000={tmp_path / 'missing'}", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_train_gan_then_generate(demo_prepared, tmp_path):
    run, syn = tmp_path / "run", tmp_path / "syn"
    r = runner.invoke(app, ["train-gan", str(demo_prepared), "--out", str(run), "--resolution", "32", "--steps", "4",
                            "--checkpoint-every", "2", "--sample-every", "2", "--log-every", "1", "--max-steps", "2",
                            "--batch-size", "8"])
    assert r.exit_code == 0, r.output
    assert "paused" in r.output
    r = runner.invoke(app, ["train-gan", str(demo_prepared), "--out", str(run), "--resume"])
    assert r.exit_code == 0, r.output
    assert "finished at step 4" in " ".join(r.output.split())
    r = runner.invoke(app, ["generate", str(run), "--out", str(syn), "--n", "5", "--label", "melanoma"])
    assert r.exit_code == 0, r.output
    assert "5 synthetic images (5 melanoma, 0 other)" in " ".join(r.output.split())


def test_serve_refuses_bad_options_before_starting(tmp_path):
    r = runner.invoke(app, ["serve", "--run", str(tmp_path / "missing"), "--max-upload-mb", "0"])
    assert r.exit_code != 0 and "must be positive" in str(r.exception or r.output)
