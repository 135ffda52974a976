"""The command line as a user meets it: help texts, the demo flow, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from melanogan.cli import app

runner = CliRunner()
COMMANDS = ["demo-data", "prepare", "audit", "demo", "train-gan", "generate", "evaluate-gan", "train", "evaluate",
            "study", "predict", "explain", "export", "serve", "calibrate", "import-synthetic", "card",
            "bench preprocess",
            "bench gan",
            "bench classifier", "bench quality", "bench serve", "bench calibrate", "bench augment", "bench travel",
            "bench ledger"]


def test_root_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("demo-data", "prepare", "audit", "demo", "bench"):
        assert name in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself(command):
    import typer.main

    cmd = typer.main.get_command(app)
    for part in command.split():
        cmd = cmd.commands[part]
    result = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "220"})
    assert result.exit_code == 0
    assert cmd.help and cmd.help.split(".")[0].split()[0] in result.output  # its docstring is shown
    for param in cmd.params:  # every option is listed, with a help text of its own
        if param.param_type_name == "option" and param.name != "help":
            assert param.opts[0] in result.output, f"{command}: {param.opts[0]} missing from --help"
            assert param.help and len(param.help) > 3, f"{command}: {param.opts[0]} has no help"


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


# ---------------------------------------------------------------------------------------- defaults
# Every CLI option either feeds a library function/dataclass parameter of the same name (or the one
# named in RENAMED), whose default must be the CLI's, or is listed in CLI_ONLY with the reason.
def _targets():
    from melanogan.bench import augment as bench_augment
    from melanogan.bench import calibrate as bench_calibrate
    from melanogan.bench import classifier as bench_classifier
    from melanogan.bench import gan as bench_gan
    from melanogan.bench import ledger as bench_ledger
    from melanogan.bench import preprocess as bench_preprocess
    from melanogan.bench import quality as bench_quality
    from melanogan.bench import serve as bench_serve
    from melanogan.bench import travel as bench_travel
    from melanogan.classify.calibrate import calibrate_site
    from melanogan.classify.card import write_card
    from melanogan.classify.evaluate import evaluate_run
    from melanogan.classify.export import export_model
    from melanogan.classify.predict import explain, predict
    from melanogan.classify.train import TrainConfig, train_classifier
    from melanogan.data.cache import CacheOptions
    from melanogan.data.demo import generate_demo_dataset
    from melanogan.data.manifest import prepare
    from melanogan.data.pack import pack_data_dir, unpack_data_dir
    from melanogan.data.splits import SplitFractions
    from melanogan.data.synthetic import import_synthetic
    from melanogan.gan.config import load_config
    from melanogan.gan.evaluate import evaluate_gan
    from melanogan.gan.sample import generate
    from melanogan.gan.train import train_gan
    from melanogan.serve.app import ServeConfig
    from melanogan.study.experiments import run_study

    return {
        "demo-data": [generate_demo_dataset], "prepare": [CacheOptions, SplitFractions, prepare], "audit": [],
        "pack": [pack_data_dir], "unpack": [unpack_data_dir],
        "demo": [], "train-gan": [load_config, train_gan], "generate": [generate], "evaluate-gan": [evaluate_gan],
        "train": [TrainConfig, train_classifier], "evaluate": [evaluate_run], "predict": [predict],
        "explain": [explain], "export": [export_model], "serve": [ServeConfig], "study": [run_study],
        "calibrate": [calibrate_site], "import-synthetic": [import_synthetic], "card": [write_card],
        "bench preprocess": [bench_preprocess.run], "bench classifier": [bench_classifier.run],
        "bench gan": [bench_gan.run], "bench quality": [bench_quality.run], "bench serve": [bench_serve.run],
        "bench calibrate": [bench_calibrate.run], "bench augment": [bench_augment.run],
        "bench travel": [bench_travel.run], "bench ledger": [bench_ledger.load],
    }


RENAMED = {("train-gan", "config"): "config_file", ("train-gan", "max_steps"): "stop_after",
           ("generate", "ema"): "use_ema", ("evaluate-gan", "pairs"): "n_pairs", ("export", "format"): "fmt",
           ("evaluate", "data"): "data_dir", ("serve", "run"): "run_dir", ("serve", "synthetic"): "synthetic_dir",
           ("serve", "real"): "real_dir", ("serve", "allowed_host"): "allowed_hosts",
           ("bench serve", "run"): "run_dir", ("prepare", "source"): "sources", ("train-gan", "out"): "run_dir",
           ("train", "out"): "run_dir", ("evaluate-gan", "real"): "real_dir", ("study", "out"): "out",
           ("calibrate", "data"): "data_dir", ("calibrate", "site"): "name",
           ("import-synthetic", "real"): "real_dir"}
CLI_ONLY = {
    ("demo", "out"): "the demo's own folder", ("demo", "n_images"): "the demo's own size",
    ("demo", "seeds"): "the demo's own seeds", ("audit", "json_out"): "an extra output file",
    ("predict", "out"): "the CLI always writes a CSV; the library writes only when given a path",
    ("serve", "host"): "fed to uvicorn and to ServeConfig.host (checked separately)",
    ("serve", "port"): "fed to uvicorn",
    **{(f"bench {b}", "json_out"): "an extra output file" for b in ("preprocess", "classifier", "serve", "quality",
                                                                       "gan", "calibrate", "augment",
                                                                       "ledger")},
}
CONVERT = {("prepare", "melanoma_folders"): lambda v: tuple(v.split(",")),
           ("bench quality", "sizes"): lambda v: tuple(int(x) for x in v.split(",")),
           ("bench calibrate", "sizes"): lambda v: tuple(int(x) for x in v.split(",")),
           ("bench travel", "holdout"): lambda v: tuple(v.split(",")),
           ("bench travel", "vary"): lambda v: tuple(v or ()),
           ("serve", "allowed_host"): lambda v: tuple(v or ()), ("train", "synthetic"): lambda v: list(v or []),
           ("train", "metadata"): lambda v: [f for f in v.split(",") if f]}


def _library_defaults(target) -> dict:
    import dataclasses
    import inspect

    from pydantic import BaseModel

    if isinstance(target, type) and issubclass(target, BaseModel):
        return {k: f.get_default(call_default_factory=True) for k, f in target.model_fields.items()
                if not f.is_required()}
    if dataclasses.is_dataclass(target):
        return {f.name: f.default for f in dataclasses.fields(target) if f.default is not dataclasses.MISSING}
    return {k: p.default for k, p in inspect.signature(target).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _plain(value):
    from enum import Enum
    from pathlib import Path

    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return value


def test_every_cli_default_equals_the_library_default_it_feeds():
    import typer.main

    from melanogan.gan.config import GanConfig

    root = typer.main.get_command(app)
    targets = _targets()
    commands = {name: cmd for name, cmd in root.commands.items() if name != "bench"}
    commands.update({f"bench {n}": c for n, c in root.commands["bench"].commands.items()})
    assert set(commands) == set(targets), "a new command needs its library targets listed here"
    checked, mismatches, unmapped = 0, [], []
    for name, cmd in commands.items():
        defaults = {}
        for target in targets[name]:
            for key, value in _library_defaults(target).items():
                defaults.setdefault(key, value)
        for param in cmd.params:
            if param.param_type_name == "argument" or param.name == "help":
                continue
            key = (name, param.name)
            lib_name = RENAMED.get(key, param.name)
            if key in CLI_ONLY:
                continue
            if name == "train-gan" and lib_name not in defaults and param.name in GanConfig.model_fields:
                # a preset override: None lets the preset (the library's default for it) decide
                assert param.default is None, f"train-gan --{param.name} must default to the preset's value"
                checked += 1
                continue
            if lib_name not in defaults:
                params = {p for t in targets[name] for p in __import__("inspect").signature(t).parameters}
                if lib_name in params or any(lib_name in getattr(t, "model_fields", {}) for t in targets[name]):
                    continue  # the library makes it required: the CLI's default is the only one
                unmapped.append(key)
                continue
            cli_value = CONVERT.get(key, lambda v: v)(param.default)
            if _plain(cli_value) != _plain(defaults[lib_name]):
                mismatches.append(f"{name} --{param.name.replace('_', '-')}: CLI {param.default!r} vs library "
                                  f"{defaults[lib_name]!r}")
            checked += 1
    assert not unmapped, f"options that feed no library parameter (map or list them): {unmapped}"
    assert not mismatches, "\n".join(mismatches)
    assert checked > 60  # the walk really compared the options


def test_recommended_settings_are_the_defaults():
    """What the README recommends is what a user gets without flags."""
    import inspect

    from melanogan.bench import travel
    from melanogan.classify.train import TrainConfig
    from melanogan.data.cache import CacheOptions
    from melanogan.data.dedup import DEFAULT_PHASH_DISTANCE
    from melanogan.study.experiments import ClassifierOptions, GanOptions

    assert CacheOptions().color_constancy is True and DEFAULT_PHASH_DISTANCE == 22
    assert CacheOptions().white_level == 0  # exposure normalisation: passed on split 40000, reverted on 43000
    assert TrainConfig().augment == ClassifierOptions().augment == "classic"
    assert TrainConfig().diagnosis_weight is None and ClassifierOptions().diagnosis_weight is None  # 0.5 when possible
    assert GanOptions().precision == TrainConfig().precision == "auto"
    # 96 px: the lever that passed the README's rule (split seed 8000); bench travel's defaults are train's
    assert TrainConfig().image_size == ClassifierOptions().image_size == 96
    assert inspect.signature(travel.run).parameters["image_size"].default == 96


def test_declared_lower_bounds_support_what_the_code_uses():
    """np.bitwise_count (near-duplicate search) exists from numpy 2.0; pandas/scipy/pyarrow/opencv/
    scikit-learn/matplotlib need releases built against numpy 2."""
    import re
    import tomllib
    from pathlib import Path

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    lower = {m.group(1).lower(): tuple(int(x) for x in m.group(2).split("."))
             for d in deps if (m := re.match(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", d))}
    needed = {"numpy": (2, 0), "pandas": (2, 2, 2), "scipy": (1, 13), "pyarrow": (16,),
              "opencv-python-headless": (4, 10), "scikit-learn": (1, 4, 2), "matplotlib": (3, 8, 4)}
    for name, minimum in needed.items():
        assert lower.get(name, ()) >= minimum, f"{name} needs >= {'.'.join(map(str, minimum))}"


API_TWINS = {"prepare": "prepare", "audit": "audit", "pack": "pack", "unpack": "unpack",
              "train-gan": "train_gan", "generate": "generate",
             "import-synthetic": "import_synthetic", "evaluate-gan": "evaluate_gan", "train": "train",
             "evaluate": "evaluate", "study": "study", "predict": "predict", "explain": "explain", "export": "export",
             "calibrate": "calibrate", "card": "card"}


def test_every_api_function_takes_its_cli_twins_options_with_the_same_defaults():
    """The Python API and the CLI are one interface: same parameter names, same defaults (and through
    the test above, the library's)."""
    import inspect

    import typer.main

    from melanogan import api

    root = typer.main.get_command(app)
    mismatches = []
    for command, function in API_TWINS.items():
        signature = inspect.signature(getattr(api, function)).parameters
        for param in root.commands[command].params:
            if param.name == "help" or ((command, param.name) in CLI_ONLY and param.name != "out"):
                continue
            assert param.name in signature, f"melanogan.{function} lacks the CLI's --{param.name}"
            api_default = signature[param.name].default
            if param.param_type_name == "argument" or (command, param.name) in CLI_ONLY:
                continue
            if api_default is inspect.Parameter.empty:
                assert param.required, f"melanogan.{function}({param.name}) is required but the CLI has a default"
                continue
            if _plain(param.default) != _plain(api_default):
                mismatches.append(f"{function}({param.name}): CLI {param.default!r} vs API {api_default!r}")
    assert not mismatches, "\n".join(mismatches)
    import melanogan

    assert set(API_TWINS.values()) <= set(dir(melanogan)) and melanogan.train is api.train
