"""The Python API: one function per CLI verb, with the CLI's parameter names and defaults (a test
walks both), returning the result objects of `melanogan.results`. The CLI is a thin printer over
these functions, so a notebook and a shell get the same files and numbers.

    import melanogan as mg
    data = mg.prepare(["ham10000=/data/HAM10000"], out="data/ham")
    run = mg.train(data.data_dir, out="runs/baseline")
    ev = mg.evaluate(run.run_dir)          # ev.metrics, ev.predictions, ev.subgroups, ev.diagnoses, ev.plot()

Errors are raised as `MelanoganError` with the same messages the CLI prints. Progress bars are
Rich's (they render in Jupyter too); `progress=False` turns them off.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd

from melanogan.data.cache import CacheOptions
from melanogan.data.dedup import DEFAULT_PHASH_DISTANCE
from melanogan.data.sources import DEFAULT_MELANOMA_FOLDERS
from melanogan.data.splits import SplitFractions
from melanogan.errors import MelanoganError
from melanogan.results import (
    Audit,
    Calibration,
    Evaluation,
    Explanation,
    Exported,
    GanRun,
    ModelCard,
    Predictions,
    Prepared,
    Quality,
    StudyResult,
    SyntheticSet,
    TrainRun,
)

__all__ = ["audit", "calibrate", "card", "evaluate", "evaluate_gan", "explain", "export", "generate",
           "import_synthetic", "predict", "prepare", "study", "train", "train_gan"]


@contextlib.contextmanager
def progress_bar(enabled: bool, description: str) -> Iterator[Callable[[int, int], None] | None]:
    """A Rich progress bar as an `on_progress(done, total)` callback (None when disabled)."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=False) as bar:
        state: dict = {}

        def update(done: int, total: int) -> None:
            if "task" not in state:
                state["task"] = bar.add_task(description, total=max(total, 1), rate="")
                state["start"] = (time.perf_counter(), done)
            t0, d0 = state["start"]
            elapsed = time.perf_counter() - t0
            rate = f"{(done - d0) / elapsed:.1f} img/s" if elapsed > 0 and done > d0 else ""
            bar.update(state["task"], completed=done, total=max(total, 1), rate=rate)

        yield update


def prepare(source: list[str] | list[tuple[str, str | Path]], out: str | Path, size: int = CacheOptions.size,
            resize_mode: str = str(CacheOptions.resize_mode), hair_removal: bool = CacheOptions.hair_removal,
            hair_method: str = str(CacheOptions.hair_method),
            color_constancy: bool = CacheOptions.color_constancy, white_level: int = CacheOptions.white_level,
            clahe: float = CacheOptions.clahe,
            train: float = SplitFractions.train,
            val: float = SplitFractions.val, test: float = SplitFractions.test, seed: int = 0, workers: int = 0,
            melanoma_folders: str = ",".join(DEFAULT_MELANOMA_FOLDERS),
            phash_distance: int = DEFAULT_PHASH_DISTANCE, progress: bool = True) -> Prepared:
    """Read dataset sources (`"KIND=PATH"` strings or `(kind, path)` pairs; KIND: siim-isic-2020,
    isic-2019, ham10000, derm7pt, folder) into one leak-free manifest and a uint8 image cache.
    In a script, call it under `if __name__ == "__main__":` (decoding uses spawned processes)."""
    from melanogan.data.manifest import prepare as run_prepare
    from melanogan.data.sources import parse_source

    sources = [parse_source(s) if isinstance(s, str) else (str(s[0]), Path(s[1])) for s in source]
    options = CacheOptions(size=size, resize_mode=resize_mode, hair_removal=hair_removal,
                           hair_method=hair_method, color_constancy=color_constancy, white_level=white_level,
                           clahe=clahe)
    with progress_bar(progress, "decoding") as on_progress:
        r = run_prepare(sources, Path(out), options, SplitFractions(train, val, test), seed, workers,
                        tuple(m for m in melanoma_folders.split(",") if m), phash_distance, on_progress=on_progress)
    return Prepared(r.data_dir, r.manifest, r.rejected, r.near_duplicates, r.cache.root, r.cache.options.size, r.notes)


def pack(data_dir: str | Path, out: str | Path, size: int = 128, quality: int = 90) -> dict:
    """Shrink DATA_DIR for a copy to another machine (e.g. a GPU box for `train-gan`): its manifest and
    its cached pixels at `size` px as JPEG `quality`. Returns the pack's pack.json."""
    from melanogan.data.pack import pack_data_dir

    return pack_data_dir(Path(data_dir), Path(out), size=size, quality=quality)


def unpack(pack_dir: str | Path, out: str | Path) -> Path:
    """Turn a `pack` back into a DATA_DIR (cache at the pack's size; its prepare.json says it is a lossy copy)."""
    from melanogan.data.pack import unpack_data_dir

    return unpack_data_dir(Path(pack_dir), Path(out))


def audit(data_dir: str | Path) -> Audit:
    """Leakage checks of a prepared DATA_DIR (patients, clusters, identical files, synthetic rows)."""
    from melanogan.data.audit import audit as run_audit

    r = run_audit(Path(data_dir))
    checks = pd.DataFrame(r.checks, columns=["check", "passed", "detail"])
    per_split = r.per_split.reset_index() if r.per_split is not None else pd.DataFrame()
    return Audit(Path(data_dir), checks, per_split, list(r.warnings), r.to_dict())


def train_gan(data_dir: str | Path, out: str | Path, preset: str = "default", config: str | Path | None = None,
              resolution: int | None = None, steps: int | None = None, batch_size: int | None = None,
              lr: float | None = None, seed: int | None = None, checkpoint_every: int | None = None,
              sample_every: int | None = None, log_every: int | None = None, kid_every: int | None = None,
              kid_features: str | None = None, resume: bool = False, accelerator: str = "auto", devices: int = 1,
              num_nodes: int = 1, precision: str = "auto", max_steps: int | None = None,
              logger: str | None = None, progress: bool = True) -> GanRun:
    """Train the conditional WGAN-GP on the training split of DATA_DIR (None = the preset's value)."""
    from melanogan.gan.config import load_config, requested_fields
    from melanogan.gan.train import train_gan as run_train_gan

    options = dict(resolution=resolution, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                   checkpoint_every=checkpoint_every, sample_every=sample_every, log_every=log_every,
                   kid_every=kid_every, kid_features=kid_features)
    config_file = Path(config) if config else None
    cfg = load_config(preset, config_file, **options)
    s = run_train_gan(Path(data_dir), Path(out), cfg, resume=resume, accelerator=accelerator, devices=devices,
                      num_nodes=num_nodes, precision=precision, stop_after=max_steps, resume_steps=steps,
                      progress=progress, logger=logger, requested=requested_fields(preset, config_file, **options))
    return GanRun(Path(out), s["step"], s["finished"], s["training_images"], s["notes"])


def generate(run_dir: str | Path, out: str | Path, n: int = 1000, label: str = "melanoma", seed: int = 0,
             ema: bool = True, checkpoint: str | Path | None = None, device: str = "cpu") -> SyntheticSet:
    """Synthetic images with a manifest in the real schema (split train), cached like real ones."""
    from melanogan.gan.sample import generate as run_generate

    manifest = run_generate(Path(run_dir), n, label, Path(out), seed=seed, use_ema=ema,
                            checkpoint=Path(checkpoint) if checkpoint else None, device=device)
    return SyntheticSet(Path(out), manifest)


def import_synthetic(folder: str | Path, out: str | Path, real: str | Path, label: str = "melanoma",
                     workers: int = 0) -> SyntheticSet:
    """Any generator's image folder as a SYN_DIR (provenance, split train, the real data's preprocessing)."""
    from melanogan.data.synthetic import import_synthetic as run_import

    manifest = run_import(Path(folder), label, Path(out), Path(real), workers)
    return SyntheticSet(Path(out), manifest, int(manifest.attrs.get("rejected", 0)))


def evaluate_gan(syn_dir: str | Path, real: str | Path, out: str | Path, split: str = "val",
                 features: list[str] | None = None, inception_weights: str | None = None,
                 pairs: int = 200) -> Quality:
    """FID, KID, precision/recall, density/coverage, diversity, memorisation and skin tone per class."""
    from melanogan.gan.evaluate import evaluate_gan as run_evaluate_gan

    run_evaluate_gan(Path(syn_dir), Path(real), Path(out), split, features, inception_weights, pairs)
    return Quality.load(Path(out))  # as written, so the API and the files agree


def train(data_dir: str | Path, out: str | Path, model: str = "small-cnn", weights: str | None = None,
          image_size: int = 96, synthetic: list[str | Path] | None = None, loss: str = "bce",
          sampler: str = "none", augment: str = "classic", color_augment: str = "rgb", style_augment: str = "none",
          illumination_augment: str = "none", crop_aspect: float | None = None, grayscale: float = 0.0,
          mixup: float = 0.0,
          coral: float = 0.0,
          excised_weight: float = 1.0,
          diagnosis_weight: float | None = None, diagnosis_vocabulary: str = "source",
          epochs: int = 30,
          max_minutes: float | None = None, max_steps: int | None = None,
          batch_size: int = 32, lr: float = 2e-3, weight_decay: float = 1e-4, patience: int = 8,
          select: str = "auc", weight_average: str = "none", ema_decay: float = 0.998, seed: int = 0,
          workers: int | None = None,
          batch_augment: bool = True, precision: str = "auto", metadata: str = "", accelerator: str = "auto",
          devices: int = 1, resume: bool = False, logger: str | None = None, progress: bool = True) -> TrainRun:
    """Train a melanoma classifier on DATA_DIR's training split (plus synthetic sets); the best epoch by
    validation ROC-AUC is kept in OUT/best."""
    from melanogan.classify.train import TrainConfig, train_classifier

    try:
        cfg = TrainConfig(model=model, weights=weights, image_size=image_size, epochs=epochs, max_minutes=max_minutes,
                          max_steps=max_steps,
                          batch_size=batch_size, lr=lr, weight_decay=weight_decay, loss=loss, sampler=sampler,
                          augment=augment, color_augment=color_augment, style_augment=style_augment,
                          illumination_augment=illumination_augment, crop_aspect=crop_aspect, grayscale=grayscale,
                          mixup=mixup,
                          coral=coral,
                          excised_weight=excised_weight,
                          diagnosis_weight=diagnosis_weight, diagnosis_vocabulary=diagnosis_vocabulary,
                          synthetic=[str(s) for s in synthetic or []],
                          patience=patience, select=select, weight_average=weight_average,
                          ema_decay=ema_decay, seed=seed, workers=workers, precision=precision,
                          batch_augment=batch_augment, metadata=metadata)
    except ValueError as exc:
        raise MelanoganError(f"invalid training options: {exc}") from exc
    summary = train_classifier(Path(data_dir), Path(out), cfg, resume=resume, accelerator=accelerator,
                               devices=devices, progress=progress, logger=logger)
    return TrainRun(Path(out), summary)


def evaluate(run_dir: str | Path, data: str | Path | None = None, split: str | None = None,
             temperature_scaling: bool = False, bootstrap: int = 1000, out: str | Path | None = None, tta: int = 1,
             log: Callable[[str], None] | None = print) -> Evaluation:
    """ROC/PR-AUC with grouped-bootstrap CIs, validation-chosen operating points, calibration and
    subgroups, on RUN_DIR's test split or on another DATA_DIR (`data`, preprocessed as in training)."""
    from melanogan.classify.evaluate import evaluate_run

    r = evaluate_run(Path(run_dir), Path(data) if data else None, split, temperature_scaling, bootstrap,
                     Path(out) if out else None, log=log, tta=tta)
    return Evaluation.load(Path(r["out"]))  # as written (NaN -> null), so the API and the files agree


def study(config: str | Path, out: str | Path, log: Callable[[str], None] | None = print) -> StudyResult:
    """Run (or resume) a study from its YAML config: every arm on the same test split, the report with
    paired tests and verdicts (STUDY_DIR/report.md, versus_baseline.csv)."""
    from melanogan.study.experiments import load_study_config, run_study

    report = run_study(load_study_config(Path(config)), Path(out), log=log)
    return StudyResult(Path(out), report)


def predict(run_dir: str | Path, inputs: list[str | Path], out: str | Path | None = None,
            threshold: str = "val-youden", batch_size: int = 32, site: str | None = None, tta: int = 1,
            metadata_csv: str | Path | None = None, progress: bool = True,
            log: Callable[[str], None] | None = print) -> Predictions:
    """Probability and decision per image, with the training preprocessing; unreadable files get an
    error instead of a score. `out`: also write the table as CSV."""
    from melanogan.classify.predict import predict as run_predict

    with progress_bar(progress, "predicting") as on_progress:
        table = run_predict(Path(run_dir), [Path(i) for i in inputs], Path(out) if out else None, threshold,
                            batch_size, on_progress=on_progress, log=log, site=site, tta=tta,
                            metadata_csv=Path(metadata_csv) if metadata_csv else None)
    return Predictions(table, Path(out) if out else None)


def explain(run_dir: str | Path, image: str | Path, out: str | Path = "heatmap.png",
            site: str | None = None) -> Explanation:
    """Grad-CAM of the melanoma score over one preprocessed image, written as a PNG overlay."""
    from melanogan.classify.predict import explain as run_explain

    r = run_explain(Path(run_dir), Path(image), Path(out), site=site)
    return Explanation(Path(image), Path(out), r["probability"])


def export(run_dir: str | Path, format: str = "onnx", out: str | Path | None = None,
           site: str | None = None) -> Exported:
    """ONNX or TorchScript file checked against PyTorch, with a JSON sidecar (shapes, preprocessing,
    thresholds)."""
    from melanogan.classify.export import export_model

    meta = export_model(Path(run_dir), format, Path(out) if out else None, site=site)
    return Exported(Path(meta["file"]), meta)


def calibrate(run_dir: str | Path, data: str | Path, site: str, split: str = "all", folds: int = 5,
              log: Callable[[str], None] | None = print, adapt_batchnorm: bool = False,
              adapt_layers: int | None = None, refit_head: bool | None = None) -> Calibration:
    """An operating point for a new site, chosen on a labelled sample of its cases (RUN_DIR/sites/SITE/);
    use it with `site=` in predict, explain and export. `adapt_batchnorm`: first adapt the model's
    batch-normalisation statistics to the sample's images (AdaBN), stored with the site; `adapt_layers`:
    only the first N batch-normalisation layers the forward pass reaches (None: all); `refit_head`:
    refit the melanoma head on the sample (at least 20 of each class; figures from out-of-fold scores);
    None (default): refit when the sample has 20 of each class, else keep the trained head; False: never."""
    from melanogan.classify.calibrate import calibrate_site

    result = calibrate_site(Path(run_dir), Path(data), site, split, folds, log=log, adapt_batchnorm=adapt_batchnorm,
                            adapt_layers=adapt_layers, refit_head=refit_head)
    return Calibration(Path(run_dir) / "sites" / site, result)


def card(run_dir: str | Path, out: str | Path | None = None) -> ModelCard:
    """The model card (markdown + html) from what the run and its evaluations measured."""
    from melanogan.classify.card import write_card

    md, html = write_card(Path(run_dir), Path(out) if out else None)
    return ModelCard(md, html)
