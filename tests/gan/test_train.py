"""GAN training: learning happens, resume is bitwise, divergence is caught, DDP agrees."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from melanogan import api
from melanogan.data.dataset import CachedImageDataset
from melanogan.data.transforms import eval_preset
from melanogan.errors import MelanoganError
from melanogan.gan import train as train_mod
from melanogan.gan.checkpoint import latest_checkpoint, load_checkpoint
from melanogan.gan.config import load_config, requested_fields
from melanogan.gan.train import GanDivergedError, not_used_on_resume, train_gan


def _stats(run_dir):
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def test_tiny_run_learns_the_colour_of_skin(demo_prepared_skin_colour, tmp_path, tiny_cfg):
    demo_prepared = demo_prepared_skin_colour
    cfg = tiny_cfg.model_copy(update={"steps": 40, "checkpoint_every": 40, "sample_every": 40, "log_every": 10})
    real = CachedImageDataset(demo_prepared, "train", transform=eval_preset(32, "tanh"))
    real_mean = torch.stack([real[i][0] for i in range(len(real))]).mean(dim=(0, 2, 3))

    def colour_gap(generator) -> float:
        with torch.no_grad():
            torch.manual_seed(0)
            fake = generator.eval()(torch.randn(64, cfg.noise_dim), torch.randint(0, 2, (64,)))
        return float((fake.mean(dim=(0, 2, 3)) - real_mean).abs().mean())

    from melanogan.gan.checkpoint import build_models

    torch.manual_seed(cfg.seed)
    initial_gap = colour_gap(build_models(cfg)[0])
    train_gan(demo_prepared, tmp_path / "run", cfg, precision="32", progress=True)
    trained = load_checkpoint(latest_checkpoint(tmp_path / "run"))["generator"]
    assert colour_gap(trained) < 0.6 * initial_gap
    with torch.no_grad():  # and it has not collapsed outright: different noise, different images
        fake = trained.eval()(torch.randn(16, cfg.noise_dim), torch.ones(16, dtype=torch.long))
    across, within = float(fake.std(0).mean()), float(fake.std((1, 2, 3)).mean())
    assert across > 0.15 * within  # a collapsed generator measured 0.11 (demo, 600 steps, colour DiffAugment)
    records = _stats(tmp_path / "run")
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    assert all(np.isfinite(r["wasserstein"]) and r["img_per_s"] > 0 for r in records)
    for name in ("config.yaml", "run.json", "samples/step-0000040.png", "samples/losses.png"):
        assert (tmp_path / "run" / name).is_file(), name
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["trained_on_split"] == "train" and run["training_images"]["melanoma"] > 0


def test_resume_is_bitwise_identical(demo_prepared, tmp_path, tiny_cfg):
    train_gan(demo_prepared, tmp_path / "full", tiny_cfg, progress=False)
    train_gan(demo_prepared, tmp_path / "parts", tiny_cfg, progress=False, stop_after=5)  # checkpoint at 4 and 5
    shutil.rmtree(tmp_path / "parts" / "checkpoints" / "step-0000005")  # "killed" after step 4's checkpoint
    (tmp_path / "parts" / "checkpoints" / "latest.json").unlink()
    train_gan(demo_prepared, tmp_path / "parts", tiny_cfg, resume=True, progress=False)
    for name in ("generator", "critic", "generator_ema"):
        a = load_file(tmp_path / "full" / "checkpoints" / "step-0000012" / f"{name}.safetensors")
        b = load_file(tmp_path / "parts" / "checkpoints" / "step-0000012" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["step"] for r in _stats(tmp_path / "parts")] == [r["step"] for r in _stats(tmp_path / "full")]


def test_divergence_stops_with_a_message_and_keeps_the_last_good_checkpoint(demo_prepared, tmp_path, tiny_cfg,
                                                                             monkeypatch):
    real_gp = train_mod.gradient_penalty
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = real_gp(*args, **kwargs)
        return value * float("nan") if calls["n"] > 10 else value  # NaN from step 6 on (2 critic steps/step)

    monkeypatch.setattr(train_mod, "gradient_penalty", poisoned)
    with pytest.raises(GanDivergedError, match="diverged at step 6") as e:
        train_gan(demo_prepared, tmp_path / "run", tiny_cfg, progress=False)
    assert "last good checkpoint" in str(e.value)
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "step-0000004"
    weights = load_checkpoint(ckpt)["generator"].state_dict()
    assert all(torch.isfinite(v.float()).all() for v in weights.values())


def test_bf16_mixed_precision_follows_fp32(demo_prepared, tmp_path, tiny_cfg):
    """bf16 (the default) and fp32 runs from the same seed see the same batches and noise: their
    first steps' losses agree to bf16's precision, and the penalty is finite and fp32-accurate."""
    cfg = tiny_cfg.model_copy(update={"steps": 3, "log_every": 1, "checkpoint_every": 3, "sample_every": 3,
                                      "diffaugment": []})
    train_gan(demo_prepared, tmp_path / "bf16", cfg, precision="bf16-mixed", progress=False)
    train_gan(demo_prepared, tmp_path / "fp32", cfg, precision="32", progress=False)
    bf16, fp32 = _stats(tmp_path / "bf16"), _stats(tmp_path / "fp32")
    assert [r["step"] for r in bf16] == [r["step"] for r in fp32] == [1, 2, 3]
    for key in ("wasserstein", "critic_loss", "generator_loss"):
        assert bf16[0][key] == pytest.approx(fp32[0][key], rel=0.05, abs=0.02), key
    assert bf16[0]["gradient_penalty"] == pytest.approx(fp32[0]["gradient_penalty"], rel=0.1, abs=1e-3)
    assert json.loads((tmp_path / "bf16" / "run.json").read_text())["precision"] == "bf16-mixed"


def test_clear_errors(demo_prepared, tmp_path, tiny_cfg):
    with pytest.raises(MelanoganError, match="unknown GAN preset"):
        load_config("stylegan")
    with pytest.raises(MelanoganError, match="nothing to resume"):
        train_gan(demo_prepared, tmp_path / "new", tiny_cfg, resume=True, progress=False)
    with pytest.raises(MelanoganError, match="precision"):
        train_gan(demo_prepared, tmp_path / "p", tiny_cfg, precision="int8", progress=False)
    cfg = tiny_cfg.model_copy(update={"steps": 2, "checkpoint_every": 2})
    train_gan(demo_prepared, tmp_path / "done", cfg, progress=False)
    with pytest.raises(MelanoganError, match="already holds a GAN run"):
        train_gan(demo_prepared, tmp_path / "done", cfg, progress=False)
    ckpt = latest_checkpoint(tmp_path / "done")
    (ckpt / "generator.safetensors").write_bytes(b"garbage")
    with pytest.raises(MelanoganError, match="cannot read the weights"):
        load_checkpoint(ckpt)


def test_empty_training_class_is_a_clear_error(demo_prepared, tmp_path, tiny_cfg):
    import pandas as pd

    from melanogan.fileio import write_parquet

    data = tmp_path / "data"
    shutil.copytree(demo_prepared, data)
    m = pd.read_parquet(data / "manifest.parquet")
    m.loc[(m["label"] == 1) & (m["split"] == "train"), "split"] = "val"
    write_parquet(data / "manifest.parquet", m)
    with pytest.raises(MelanoganError, match="no melanoma image"):
        train_gan(data, tmp_path / "run", tiny_cfg, progress=False)


@pytest.mark.slow
def test_two_process_ddp_trains_and_agrees_with_one_process(demo_prepared, tmp_path, tiny_cfg):
    """gloo on CPU. Both runs see the same global batches, noise and penalty points, so gradients
    averaged over 2 x 8 samples must equal those over 16 up to float summation order. (Generator
    BatchNorm is off here: its statistics would be per process, and SyncBatchNorm is GPU-only;
    DiffAugment is off: its draws are per process.)"""
    cfg = tiny_cfg.model_copy(update={"steps": 6, "checkpoint_every": 6, "sample_every": 6, "diffaugment": [],
                                      "generator_norm": "none"})
    train_gan(demo_prepared, tmp_path / "one", cfg, accelerator="cpu", precision="32", progress=False)
    train_gan(demo_prepared, tmp_path / "two", cfg, accelerator="cpu", devices=2, precision="32", progress=False)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    one = load_file(tmp_path / "one" / "checkpoints" / "step-0000006" / "critic.safetensors")
    two = load_file(tmp_path / "two" / "checkpoints" / "step-0000006" / "critic.safetensors")
    # Adam moves every weight by ~lr whatever the gradient's size, so a near-zero gradient whose sign
    # differs in the last float bits moves a weight by up to 2 lr: that is the absolute tolerance.
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=2 * cfg.lr), k
    s1, s2 = _stats(tmp_path / "one"), _stats(tmp_path / "two")
    assert [r["step"] for r in s1] == [r["step"] for r in s2]
    for a, b in zip(s1, s2, strict=True):
        assert abs(a["wasserstein"] - b["wasserstein"]) < 1e-3 * abs(a["wasserstein"]) + 1e-4


def test_kid_tracking_keeps_the_best_checkpoint(demo_prepared, tmp_path, tiny_cfg):
    cfg = tiny_cfg.model_copy(update={"steps": 6, "kid_every": 2, "kid_samples": 32})
    train_gan(demo_prepared, tmp_path / "run", cfg, progress=False)
    records = [json.loads(x) for x in (tmp_path / "run" / "kid.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6] and records[0]["best"]
    assert {r["reference"] for r in records} == {"val"}  # images the GAN never trained on
    from melanogan.gan.train import KidTracker

    tracker = KidTracker(demo_prepared, cfg, tmp_path / "run")
    val_mel = CachedImageDataset(demo_prepared, "val", labels=[1])
    assert len(tracker.real) == len(val_mel)  # scored against the validation melanomas, not the training ones
    best = min(records, key=lambda r: r["kid"])
    state = json.loads((tmp_path / "run" / "checkpoints" / "best-kid" / "state.json").read_text())
    assert state["step"] == best["step"] and state["kid"] == pytest.approx(best["kid"])


def test_preloaded_batches_equal_the_per_image_path(demo_prepared, tiny_cfg):
    from melanogan.gan.train import BatchSource

    source = BatchSource(demo_prepared, tiny_cfg)
    assert source.preloaded is not None
    fast, labels = source.batch(16, seed=3)
    source.preloaded = None  # what a dataset too large to preload takes
    slow, labels_slow = source.batch(16, seed=3)
    assert torch.equal(fast, slow) and torch.equal(labels, labels_slow)


def test_a_sampling_copy_without_critic_generates_but_does_not_resume(demo_prepared, tmp_path, tiny_cfg):
    from melanogan.gan.sample import generate

    train_gan(demo_prepared, tmp_path / "run", tiny_cfg.model_copy(update={"steps": 4}), progress=False)
    ckpt = latest_checkpoint(tmp_path / "run")
    (ckpt / "critic.safetensors").unlink()
    (ckpt / "optimizers.pt").unlink()
    manifest = generate(tmp_path / "run", 3, "melanoma", tmp_path / "syn")
    assert len(manifest) == 3
    with pytest.raises(MelanoganError, match="sampling only"):
        train_gan(demo_prepared, tmp_path / "run", tiny_cfg, resume=True, resume_steps=6, progress=False)


def test_requested_fields_are_only_what_was_asked_for(tmp_path):
    file = tmp_path / "gan.yaml"
    file.write_text("n_critic: 3\ngp_lambda: 5.0\n")
    assert requested_fields() == set()  # the default preset, no file, no option: nothing requested
    assert requested_fields("default", None, lr=None, steps=40) == {"steps"}
    assert requested_fields("original", file, lr=1e-3, seed=None) == {"preset", "n_critic", "gp_lambda", "lr"}


def test_not_used_on_resume_names_what_differs_and_lets_steps_grow(tiny_cfg):
    assert not_used_on_resume({"lr": tiny_cfg.lr, "steps": tiny_cfg.steps}, tiny_cfg) is None
    note = not_used_on_resume({"lr": 1e-3, "steps": 6, "seed": 0}, tiny_cfg)
    assert note == ("resumed with the run's own settings (its checkpoint's config); these options differ from them "
                    "and were not used: lr 0.001 (the run's: 0.0005); steps 6 (the run's: 12) (--steps can extend a "
                    "resumed run, not shorten it; --max-steps pauses it). Train a new run (another --out) to change "
                    "them.")


def test_train_gan_resume_names_the_options_it_did_not_use(demo_prepared, tmp_path, tiny_cfg):
    """Through the API as the CLI calls it: the run's settings come from a --config file and options;
    resuming with the same file plus a different lr and a smaller --steps keeps the run's lr and steps and
    says so, while a larger --steps extends the run without a note."""
    file = tmp_path / "tiny.yaml"
    file.write_text(yaml.safe_dump(tiny_cfg.model_dump(mode="json", exclude={"steps", "lr"})))
    out = tmp_path / "run"
    first = api.train_gan(demo_prepared, out, config=file, steps=6, lr=5e-4, max_steps=4, progress=False)
    assert (first.step, first.finished, first.notes) == (4, False, [])
    resumed = api.train_gan(demo_prepared, out, config=file, steps=5, lr=1e-3, resume=True, progress=False)
    assert resumed.step == 6 and resumed.finished
    assert resumed.notes == ["resumed with the run's own settings (its checkpoint's config); these options differ "
                             "from them and were not used: lr 0.001 (the run's: 0.0005); steps 5 (the run's: 6) "
                             "(--steps can extend a resumed run, not shorten it; --max-steps pauses it). Train a new "
                             "run (another --out) to change them."]
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 5e-4
    extended = api.train_gan(demo_prepared, out, config=file, steps=8, lr=5e-4, resume=True, progress=False)
    assert (extended.step, extended.notes) == (8, [])


def test_precision_history_keeps_each_stretch_and_drops_steps_trained_again():
    from melanogan.gan.train import precision_history, precision_switch_note

    assert precision_history(None, 0, "32-true") == [{"from_step": 0, "precision": "32-true"}]
    # resumed in the same precision: one stretch still
    first = {"precision": "32-true", "precision_history": [{"from_step": 0, "precision": "32-true"}]}
    assert precision_history(first, 40, "32-true") == [{"from_step": 0, "precision": "32-true"}]
    # resumed in another: a second stretch from the resumed step
    mixed = precision_history(first, 40, "bf16-mixed")
    assert mixed == [{"from_step": 0, "precision": "32-true"}, {"from_step": 40, "precision": "bf16-mixed"}]
    # resumed again from a checkpoint before the switch: the bf16 stretch is trained again, in 32
    assert precision_history({"precision": "bf16-mixed", "precision_history": mixed}, 30, "32-true") == \
        [{"from_step": 0, "precision": "32-true"}]
    # a run.json from before the history: its one precision covers the steps so far
    assert precision_history({"precision": "32-true"}, 40, "bf16-mixed") == mixed
    assert precision_switch_note({"precision": "32-true"}, "32-true") is None
    assert precision_switch_note(None, "bf16-mixed") is None
    assert precision_switch_note({"precision": "32-true"}, "bf16-mixed") == (
        "resumed in precision bf16-mixed; the run's steps so far were trained in 32-true (run.json's "
        "precision_history records each stretch). Pass --precision 32-true to continue as it was trained.")


def test_a_gan_resumed_in_another_precision_says_so_and_records_both(demo_prepared, tmp_path, tiny_cfg):
    file = tmp_path / "tiny.yaml"
    file.write_text(yaml.safe_dump(tiny_cfg.model_dump(mode="json", exclude={"steps"})))
    out = tmp_path / "run"
    first = api.train_gan(demo_prepared, out, config=file, steps=6, max_steps=4, precision="32", accelerator="cpu",
                          progress=False)
    assert first.notes == [] and json.loads((out / "run.json").read_text())["precision_history"] == \
        [{"from_step": 0, "precision": "32-true"}]
    with warnings.catch_warnings():  # bf16 on a CPU without native bf16 warns that it is slow: 2 steps here
        warnings.simplefilter("ignore")
        resumed = api.train_gan(demo_prepared, out, config=file, resume=True, precision="bf16-mixed",
                                accelerator="cpu", progress=False)
    assert resumed.step == 6 and resumed.notes == [
        "resumed in precision bf16-mixed; the run's steps so far were trained in 32-true (run.json's "
        "precision_history records each stretch). Pass --precision 32-true to continue as it was trained."]
    run = json.loads((out / "run.json").read_text())
    assert run["precision"] == "bf16-mixed"
    assert run["precision_history"] == [{"from_step": 0, "precision": "32-true"},
                                        {"from_step": 4, "precision": "bf16-mixed"}]
