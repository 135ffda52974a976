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


def _decode_options(info: dict) -> dict | None:
    """The run's cache options with every field spelled out (a run from before `hair_method` gets the
    mask it was trained with), so that a consumer of the sidecar need not know our defaults."""
    from melanogan.data.cache import CacheOptions

    return CacheOptions.from_dict(info["cache_options"]).to_dict() if info.get("cache_options") else None


def _check(reference: np.ndarray, exported: np.ndarray, atol: float) -> float:
    diff = float(np.max(np.abs(reference - exported)))
    if not np.isfinite(diff) or diff > atol:
        raise MelanoganError(f"the exported model disagrees with PyTorch (max |difference| {diff:.3g} > {atol}); "
                             "the file was not kept.")
    return diff


class _WithMetadata(torch.nn.Module):
    """The classifier with metadata as a positional input (exporters trace positional inputs)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        return self.model(x, metadata)


def export_model(run_dir: Path, fmt: str, out: Path | None = None, atol: float = 1e-4, site: str | None = None) -> dict:
    """Export RUN_DIR/best to `fmt`; verify on a random batch of 3; write OUT and OUT.json (with a
    calibrated `site`'s temperature and thresholds instead of the validation ones)."""
    if fmt not in FORMATS:
        raise MelanoganError(f"--format {fmt!r}: use onnx or torchscript.")
    run_dir = Path(run_dir)
    model, cfg, state = load_model(run_dir / "best")
    calibration = None
    if site:
        from melanogan.classify.calibrate import apply_site, site_calibration

        calibration = site_calibration(run_dir, site)  # refused if it belongs to another checkpoint
        apply_site(model, run_dir, site, calibration)  # the exported graph carries the site's statistics
    model = model.float().eval()
    out = Path(out) if out else run_dir / "export" / f"model{FORMATS[fmt]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    check = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    inputs, check_inputs, names = (example,), (check,), ["image"]
    if cfg.metadata:  # a second input: the encoded metadata (layout and the "missing" code in the sidecar)
        from melanogan.data.metadata import metadata_dim

        model = _WithMetadata(model)
        dim = metadata_dim(cfg.metadata)
        inputs = (example, torch.rand(2, dim))
        check_inputs = (check, torch.rand(3, dim, generator=torch.Generator().manual_seed(1)))
        names = ["image", "metadata"]
    with torch.no_grad():
        reference = model(*check_inputs).numpy()
    with atomic_path(out, suffix=FORMATS[fmt]) as tmp:
        if fmt == "onnx":
            try:
                import onnxruntime as ort
            except ImportError as exc:
                raise MelanoganError("ONNX export needs the optional packages: pip install 'melanogan[export]' "
                                     "(onnx, onnxscript, onnxruntime).") from exc
            batch = torch.export.Dim("batch")
            shapes = {"x": {0: batch}} if not cfg.metadata else {"x": {0: batch}, "metadata": {0: batch}}
            torch.onnx.export(model, inputs, str(tmp), input_names=names, output_names=["logit"],
                              dynamic_shapes=shapes, dynamo=True, verbose=False)
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            exported = session.run(None, {n: t.numpy() for n, t in zip(names, check_inputs, strict=True)})[0]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # jit.trace is deprecated but still the portable format
                traced = torch.jit.trace(model, inputs)
                traced.save(str(tmp))
                exported = torch.jit.load(str(tmp))(*check_inputs).detach().numpy()
        max_diff = _check(reference, exported, atol)
    info = read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    temperature = 1.0
    if calibration:
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
            "batchnorm": _batchnorm_note(site, calibration),
            "head": _head_note(site, calibration),
            "preprocessing": {"decode": _decode_options(info), "resize_to": cfg.image_size,
                              "scale": "x / 255", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
            "thresholds": thresholds,
            "model": cfg.model, "best_epoch": state.get("epoch"), "max_abs_difference_vs_pytorch": max_diff}
    if cfg.metadata:
        from melanogan.data.metadata import METADATA_LAYOUT, metadata_dim, missing_vector

        meta["metadata_input"] = {"name": "metadata", "shape": ["batch", metadata_dim(cfg.metadata)],
                                  "dtype": "float32", "fields": cfg.metadata,
                                  "layout": {f: METADATA_LAYOUT[f] for f in cfg.metadata},
                                  "all_missing": missing_vector(cfg.metadata).tolist()}
    write_json(out.with_suffix(out.suffix + ".json"), meta)
    return meta


def _batchnorm_note(site: str | None, calibration: dict | None) -> str:
    """What the exported graph's batch normalisation is: as trained, or adapted to the site (all its
    layers, or the first N; calibrations made before `--adapt-layers` adapted all)."""
    b = calibration and calibration.get("batchnorm")
    if not b:
        return "as trained"
    layers = b.get("adapted_layers")
    part = (f" (first {len(layers)} of {b['layers_of_model']} layers)"
            if layers is not None and len(layers) < b["layers_of_model"] else "")
    return f"adapted to site {site} on {b['adapted_on_images']} images{part}"


def _head_note(site: str | None, calibration: dict | None) -> str:
    """What the exported graph's melanoma head is: as trained, or refitted on the site's sample."""
    h = calibration and calibration.get("head")
    if not h:
        return "as trained"
    return f"refitted on site {site}'s {h['fitted_on_images']} labelled images (lambda {h['lambda']})"
