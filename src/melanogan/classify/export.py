"""`melanogan export`: a deployable classifier (ONNX or TorchScript) whose outputs are checked
against PyTorch before the file is kept, plus the preprocessing a deployment must reproduce."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from melanogan.classify.train import load_model
from melanogan.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from melanogan.errors import MelanoganError
from melanogan.fileio import atomic_path, read_json, write_json

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}


def _check(reference: np.ndarray, exported: np.ndarray, atol: float) -> float:
    diff = float(np.max(np.abs(reference - exported)))
    if not np.isfinite(diff) or diff > atol:
        raise MelanoganError(f"the exported model disagrees with PyTorch (max |difference| {diff:.3g} > {atol}); "
                             "the file was not kept.")
    return diff


def export_model(run_dir: Path, fmt: str, out: Path | None = None, atol: float = 1e-4, site: str | None = None) -> dict:
    """Export RUN_DIR/best to `fmt`; verify on a random batch of 3; write OUT and OUT.json (with a
    calibrated `site`'s temperature and thresholds instead of the validation ones)."""
    if fmt not in FORMATS:
        raise MelanoganError(f"--format {fmt!r}: use onnx or torchscript.")
    run_dir = Path(run_dir)
    model, cfg, state = load_model(run_dir / "best")
    model = model.float().eval()
    out = Path(out) if out else run_dir / "export" / f"model{FORMATS[fmt]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    check = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(check).numpy()
    with atomic_path(out, suffix=FORMATS[fmt]) as tmp:
        if fmt == "onnx":
            try:
                import onnxruntime as ort
            except ImportError as exc:
                raise MelanoganError("ONNX export needs the optional packages: pip install 'melanogan[export]' "
                                     "(onnx, onnxscript, onnxruntime).") from exc
            torch.onnx.export(model, (example,), str(tmp), input_names=["image"], output_names=["logit"],
                              dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, dynamo=True, verbose=False)
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            exported = session.run(None, {"image": check.numpy()})[0]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # jit.trace is deprecated but still the portable format
                traced = torch.jit.trace(model, example)
                traced.save(str(tmp))
                exported = torch.jit.load(str(tmp))(check).detach().numpy()
        max_diff = _check(reference, exported, atol)
    info = read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    temperature = 1.0
    if site:
        from melanogan.classify.calibrate import site_calibration

        calibration = site_calibration(run_dir, site)  # refused if it belongs to another checkpoint
        thresholds, temperature = calibration["thresholds"], calibration["temperature"]
    else:
        try:  # the thresholds of this very checkpoint (recomputed if the stored ones are of another)
            from melanogan.classify.predict import run_thresholds

            thresholds = run_thresholds(run_dir)
        except MelanoganError:
            thresholds = None  # training data not here to choose them: the sidecar says so (null)
    meta = {"format": fmt, "file": str(out), "input": {"name": "image", "shape": ["batch", 3, cfg.image_size,
                                                                                   cfg.image_size],
                                                       "dtype": "float32", "layout": "NCHW RGB"},
            "output": {"name": "logit", "meaning": f"melanoma logit; probability = sigmoid(logit / {temperature:g})"},
            "temperature": temperature, "thresholds_chosen_on": f"site {site}" if site else "validation",
            "preprocessing": {"decode": info.get("cache_options"), "resize_to": cfg.image_size,
                              "scale": "x / 255", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
            "thresholds": thresholds,
            "model": cfg.model, "best_epoch": state.get("epoch"), "max_abs_difference_vs_pytorch": max_diff}
    write_json(out.with_suffix(out.suffix + ".json"), meta)
    return meta
