"""The shared training progress bar, and that both training loops drive it."""

from __future__ import annotations

from melanogan.runtime import TrainingBar


def test_training_bar_tracks_completed_steps_and_status():
    bar = TrainingBar("GAN", total=10, completed=2)
    try:
        task = bar._progress.tasks[0]
        assert (task.total, task.completed, task.fields["info"]) == (10, 2, "")
        bar.update("W 0.1")
        assert (task.completed, task.fields["info"]) == (2, "W 0.1")  # a status alone does not advance the bar
        bar.update("W 0.2", completed=5)
        assert (task.completed, task.fields["info"]) == (5, "W 0.2")
    finally:
        bar.close()
    eta_less = TrainingBar("train", total=3, eta=False)
    eta_less.close()
    assert len(eta_less._progress.columns) == len(bar._progress.columns) - 2


def test_auto_precision_is_bf16_only_where_the_hardware_runs_it_natively(monkeypatch):
    import pytest
    import torch

    from melanogan import runtime
    from melanogan.errors import MelanoganError

    def machine(cuda: bool, cuda_bf16: bool, cpu_bf16: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: cpu_bf16)

    machine(cuda=False, cuda_bf16=False, cpu_bf16=False)  # an AVX2 CPU: bf16 would be emulated
    assert runtime.fabric_precision("auto", "auto") == runtime.fabric_precision("auto", "cpu") == "32-true"
    with pytest.warns(UserWarning, match="emulates"):
        assert runtime.fabric_precision("bf16-mixed", "cpu") == "bf16-mixed"  # asked for: runs, with a warning
    machine(cuda=False, cuda_bf16=False, cpu_bf16=True)  # AVX-512 BF16 or AMX
    assert runtime.fabric_precision("auto", "auto") == "bf16-mixed"
    machine(cuda=True, cuda_bf16=True, cpu_bf16=False)
    assert runtime.fabric_precision("auto", "auto") == runtime.fabric_precision("auto", "cuda") == "bf16-mixed"
    assert runtime.fabric_precision("auto", "cpu") == "32-true"  # the CPU's own answer, GPU or not
    machine(cuda=True, cuda_bf16=False, cpu_bf16=True)  # a GPU before Ampere
    assert runtime.fabric_precision("auto", "gpu") == "32-true"
    with pytest.raises(MelanoganError, match="no bf16 support"):
        runtime.fabric_precision("bf16-mixed", "cuda")
    assert runtime.fabric_precision("32", "cuda") == "32-true"
    with pytest.raises(MelanoganError, match="use auto, 32"):
        runtime.fabric_precision("fp8", "cpu")


def test_a_classifier_run_stores_the_precision_auto_chose(demo_prepared, tmp_path, monkeypatch):
    import json

    from melanogan import runtime
    from melanogan.classify.train import TrainConfig, train_classifier

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    cfg = TrainConfig(model="small-cnn", image_size=32, epochs=1, batch_size=8, workers=0)
    assert cfg.precision == "auto"
    train_classifier(demo_prepared, tmp_path / "run", cfg, accelerator="cpu", progress=False)
    assert json.loads((tmp_path / "run" / "best" / "state.json").read_text())["config"]["precision"] == "32-true"


def test_machine_info_names_the_cpu_model_the_cores_allowed_and_the_gpu_only_when_used(monkeypatch):
    import torch

    from melanogan import runtime

    monkeypatch.setattr(runtime.Path, "read_text", lambda self: "processor\t: 0\nmodel name\t: Test CPU 9000 @ 2GHz\n"
                        if str(self) == "/proc/cpuinfo" else "")
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Test GPU")
    info = runtime.machine_info("cuda")
    assert info == {"cpu": "Test CPU 9000 @ 2GHz", "cores": 3, "cpu_native_bf16": True, "gpu": "Test GPU",
                    "torch": torch.__version__}
    assert runtime.machine_info("cpu")["gpu"] is None  # a CPU run on a machine that has a GPU
