"""`melanogan predict` and `melanogan explain`: use a trained classifier on new images.

Preprocessing is the training data's (decode, crop, hair removal, colour constancy, from the run's
run.json) followed by the evaluation preset, so predictions cannot drift from training. Decision
thresholds are the ones chosen on validation, stored in RUN_DIR/best/thresholds.json.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from melanogan.classify import metrics as M
from melanogan.classify.train import load_model
from melanogan.data.images import ImageRejected, decode_file
from melanogan.data.manifest import cache_for
from melanogan.data.metadata import encode_metadata, read_metadata_csv
from melanogan.data.sources import IMAGE_EXTENSIONS
from melanogan.data.transforms import eval_preset
from melanogan.errors import MelanoganError
from melanogan.fileio import read_json, write_csv, write_json

THRESHOLD_NAMES = ("val-youden", "val-sens95")


def checkpoint_sha256(folder: Path) -> str:
    """Hash of a checkpoint's weights: what stored thresholds are tied to."""
    from melanogan.fileio import file_sha256

    return file_sha256(Path(folder) / "model.safetensors")


def run_thresholds(run_dir: Path, log=None, tta: int = 1) -> dict[str, float]:
    """Validation-chosen thresholds of a run's best checkpoint, stored in best/thresholds.json with
    the checkpoint's hash. A stored file of another checkpoint (e.g. `best/` improved by --resume) is
    recomputed, never used: its thresholds belong to another model. Scores are fp32, as `predict`'s.
    With `tta` > 1 the scores are TTA-averaged, so are the thresholds (best/thresholds-ttaN.json)."""
    run_dir = Path(run_dir)
    path = run_dir / "best" / ("thresholds.json" if tta == 1 else f"thresholds-tta{tta}.json")
    current = checkpoint_sha256(run_dir / "best")
    if path.is_file():
        stored = read_json(path)
        if stored.get("checkpoint_sha256") == current:
            return {k: float(stored[k]) for k in THRESHOLD_NAMES}
        if log:
            log(f"{path} belongs to another checkpoint than {run_dir / 'best'}; choosing the thresholds again")
    from melanogan.classify.evaluate import predict_split, run_cache_options

    model, cfg, _ = load_model(run_dir / "best")
    data_dir = Path(read_json(run_dir / "run.json")["data_dir"])
    if not (data_dir / "manifest.parquet").is_file():
        raise MelanoganError(f"{run_dir}: thresholds for this checkpoint were never stored and the training data "
                             f"({data_dir}) is not here to choose them; pass --threshold with a number (e.g. 0.5).")
    val = predict_split(model, cfg, data_dir, ["val"], cache=cache_for(data_dir, run_cache_options(run_dir), log),
                        tta=tta)
    thresholds = M.validation_thresholds(val["label"].to_numpy(), M.sigmoid(val["logit"].to_numpy()))
    write_json(path, {**thresholds, "checkpoint_sha256": current, "chosen_on": "validation", "precision": "32",
                      "tta": tta})
    return thresholds


def resolve_threshold(run_dir: Path, threshold: str, log=None, site: str | None = None,
                      tta: int = 1) -> tuple[str, float]:
    """(name, value) of `threshold`: a named one chosen on validation (with the same TTA as the
    scores), or on a calibrated site's sample when `site` is given, or a number."""
    if threshold in THRESHOLD_NAMES:
        if site:
            from melanogan.classify.calibrate import site_calibration

            chosen = site_calibration(run_dir, site)["thresholds"][threshold]
            return f"site:{site}:{threshold.removeprefix('val-')}", float(chosen)
        return threshold, float(run_thresholds(run_dir, log, tta)[threshold])
    try:
        value = float(threshold)
    except ValueError:
        raise MelanoganError(f"--threshold {threshold!r}: use val-youden, val-sens95 or a number in [0, 1].") from None
    if not 0 <= value <= 1 or math.isnan(value):
        raise MelanoganError(f"--threshold {threshold!r}: a number must be in [0, 1].")
    return "fixed", value


def list_images(inputs: list[Path]) -> list[Path]:
    """Files as given, folders expanded recursively to their image files (sorted)."""
    files: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        else:
            files.append(item)
    if not files:
        raise MelanoganError(f"no image files found in {', '.join(map(str, inputs))}.")
    return files


class Predictor:
    """A loaded run: preprocessing + model + thresholds, for the CLI and the web app."""

    def __init__(self, run_dir: Path, device: str = "cpu", site: str | None = None, tta: int = 1):
        from melanogan.classify.tta import check_tta

        self.tta = check_tta(tta)
        if site and tta > 1:
            raise MelanoganError(f"--site {site} with --tta {tta}: the site's temperature and thresholds were chosen "
                                 "on scores without TTA; use --tta 1 with --site.")
        self.run_dir = Path(run_dir)
        self.model, self.cfg, _ = load_model(self.run_dir / "best", device)
        # A calibrated site's probabilities are sigmoid(logit / T), T fitted on its sample.
        self.temperature = 1.0
        if site:  # and, when calibrated with --adapt-batchnorm, the site's batch-normalisation statistics
            from melanogan.classify.calibrate import apply_site, site_calibration

            calibration = site_calibration(self.run_dir, site)
            self.temperature = float(calibration["temperature"])
            apply_site(self.model, self.run_dir, site, calibration)
        from melanogan.classify.evaluate import run_cache_options

        self.options = run_cache_options(self.run_dir)
        self.transform = eval_preset(self.cfg.image_size)
        self.device = torch.device(device)

    def preprocess_file(self, path: Path) -> tuple[np.ndarray, torch.Tensor]:
        pixels = decode_file(str(path), self.options.size, **self.options.decode_kwargs()).pixels
        return pixels, self.transform(torch.from_numpy(pixels.copy()).permute(2, 0, 1))

    @torch.no_grad()
    def logits(self, batch: torch.Tensor, metadata: pd.DataFrame | None = None) -> np.ndarray:
        """Melanoma logits of preprocessed images; `metadata` (rows aligned with `batch`, columns age,
        sex, anatom_site, any missing) for a model trained with metadata, else every field "missing"."""
        from melanogan.classify.tta import tta_logits

        self.model.eval()
        meta = None
        if self.cfg.metadata and metadata is not None:
            meta = torch.from_numpy(encode_metadata(metadata, self.cfg.metadata)).to(self.device)
        scorer = self.model if meta is None else (lambda v: self.model(v, meta))
        return tta_logits(scorer, batch.to(self.device), self.tta).float().cpu().numpy()

    def probability(self, logit) -> np.ndarray:
        return M.sigmoid(np.asarray(logit) / self.temperature)


def predict(run_dir: Path, inputs: list[Path], out: Path | None = None, threshold: str = "val-youden",
            batch_size: int = 32, on_progress=None, log=None, site: str | None = None, tta: int = 1,
            metadata_csv: Path | None = None) -> pd.DataFrame:
    """Probability and decision for every image; unreadable files get an `error` instead of a score.
    `log` is told when the stored thresholds belonged to another checkpoint and were chosen again.
    `site`: a site calibrated with `melanogan calibrate` (its temperature and thresholds). `tta`:
    logits averaged over flips/rotations, thresholds chosen on validation scored the same way.
    `metadata_csv`: age/sex/site per image for a run trained with --metadata (data/metadata.py);
    images it does not list, or no CSV, are scored with metadata "missing" (column `metadata`)."""
    predictor = Predictor(run_dir, site=site, tta=tta)
    uses_metadata = bool(predictor.cfg.metadata)
    table_meta = read_metadata_csv(metadata_csv) if metadata_csv is not None else None
    if table_meta is not None and not uses_metadata:
        raise MelanoganError(f"{run_dir} was trained without metadata; drop --metadata-csv (or train with --metadata).")
    name, t = resolve_threshold(run_dir, threshold, log, site, tta)
    files = list_images(inputs)
    rows: list[dict] = []
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        meta = None
        if uses_metadata:
            names = [Path(rows[i]["path"]).name for i, _ in pending]
            known = table_meta.reindex(names) if table_meta is not None else pd.DataFrame(index=names)
            meta = known.reindex(columns=["age", "sex", "anatom_site"])
            for (i, _), (_, r) in zip(pending, meta.iterrows(), strict=True):
                rows[i]["metadata"] = "given" if r.notna().any() else "missing"
        logits = predictor.logits(torch.stack([x for _, x in pending]), meta)
        for (i, _), z in zip(pending, logits, strict=True):
            p = float(predictor.probability(z))
            rows[i].update(logit=float(z), probability=p, decision="melanoma" if p >= t else "not melanoma")
        pending.clear()

    for k, path in enumerate(files):
        rows.append({"path": str(path), "probability": np.nan, "logit": np.nan, "decision": "", "threshold": t,
                     "threshold_name": name, "error": "", **({"metadata": ""} if uses_metadata else {})})
        try:
            _, x = predictor.preprocess_file(path)
            pending.append((k, x))
        except ImageRejected as exc:
            rows[k]["error"] = f"{exc.reason}: {exc.detail}"
        if len(pending) >= batch_size:
            flush()
        if on_progress:
            on_progress(k + 1, len(files))
    flush()
    table = pd.DataFrame(rows)
    if out:
        write_csv(out, table)
    return table


def _gradcam_layer(model, x: torch.Tensor) -> tuple[torch.nn.Module, bool]:
    """The module whose output Grad-CAM uses: the last leaf module that outputs a spatial feature map
    (after its activation, e.g. the final ReLU before pooling); for ViT the last encoder block's patch
    tokens, reshaped to a grid."""
    backbone = model.backbone
    if hasattr(backbone, "encoder") and hasattr(backbone.encoder, "layers"):
        return backbone.encoder.layers[-1], True
    seen: list[torch.nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, _i, out: seen.append(mod)
                                     if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[-1] > 1 else None)
             for m in backbone.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model.eval()(x[None])
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise MelanoganError("this model has no spatial feature map for Grad-CAM.")
    return seen[-1], False


def gradcam(model, x: torch.Tensor) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) of the melanoma logit for one (3, H, W) input: (H, W) in [0, 1]."""
    layer, tokens = _gradcam_layer(model, x)
    store: dict = {}

    def hook(_m, _inp, out):  # a module called several times (a shared ReLU): the last call counts
        out.retain_grad()
        store["act"] = out

    handle = layer.register_forward_hook(hook)
    try:
        model.eval()
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logit = model(x[None].requires_grad_(True))
            logit.sum().backward()
    finally:
        handle.remove()
    act, grad = store["act"], store["act"].grad
    if tokens:  # (1, 1 + h*w, D) -> (1, D, h, w), dropping the class token
        side = math.isqrt(act.shape[1] - 1)
        act = act[:, 1:].transpose(1, 2).reshape(1, -1, side, side)
        grad = grad[:, 1:].transpose(1, 2).reshape(1, -1, side, side)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * act).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam.detach()
    cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-12)
    return cam.numpy()


def overlay(pixels: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Heat map (jet) blended over the RGB image."""
    import cv2
    import matplotlib

    heat = (matplotlib.colormaps["jet"](cv2.resize(cam, (pixels.shape[1], pixels.shape[0])))[..., :3] * 255)
    return np.clip((1 - alpha) * pixels + alpha * heat, 0, 255).astype(np.uint8)


def explain(run_dir: Path, image: Path, out: Path, site: str | None = None) -> dict:
    """Write a Grad-CAM overlay PNG for one image; returns probability and paths."""
    from PIL import Image

    from melanogan.fileio import atomic_path

    predictor = Predictor(run_dir, site=site)
    try:
        pixels, x = predictor.preprocess_file(image)
    except ImageRejected as exc:
        raise MelanoganError(f"{image}: {exc.reason}: {exc.detail}") from exc
    cam = gradcam(predictor.model, x)
    logit = float(predictor.logits(x[None])[0])
    with atomic_path(out, suffix=".png") as tmp:
        Image.fromarray(overlay(pixels, cam)).save(tmp, format="PNG")
    return {"image": str(image), "heatmap": str(out), "probability": float(predictor.probability(logit)), "cam": cam}
