"""The `melanogan` command line. Thin: parses options, calls the packages, prints results."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from melanogan import __version__
from melanogan.data.cache import CacheOptions
from melanogan.data.dedup import DEFAULT_PHASH_DISTANCE
from melanogan.data.sources import DEFAULT_MELANOMA_FOLDERS
from melanogan.data.splits import SplitFractions
from melanogan.errors import MelanoganError

app = typer.Typer(
    name="melanogan",
    help="Melanoma detection in dermoscopic images, with a conditional WGAN-GP against class imbalance.\n\n"
    "Typical flow: `prepare` a dataset (or `demo-data` for a phantom one), `audit` it for leakage, then "
    "train and evaluate. `melanogan demo` runs the whole pipeline on generated demo data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks: measured performance figures (never part of the tests).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console(stderr=False)
err_console = Console(stderr=True)


@app.callback(invoke_without_command=True)
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False) -> None:
    if version:
        console.print(f"melanogan {__version__}")
        raise typer.Exit()


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option("--out", help="Folder to write train.csv and jpeg/train/*.jpg into.")],
    n_images: Annotated[int, typer.Option("--n-images", help="Number of images.")] = 400,
    melanoma_rate: Annotated[float, typer.Option("--melanoma-rate", help="Share of melanoma images.")] = 0.10,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same dataset.")] = 0,
    width: Annotated[int, typer.Option(help="Image width in pixels.")] = 320,
    height: Annotated[int, typer.Option(help="Image height in pixels.")] = 256,
) -> None:
    """Generate a dermoscopy-like phantom dataset in the SIIM-ISIC 2020 layout.

    Melanoma phantoms follow the ABCD rule (asymmetric, irregular border, several colours incl. a
    blue-white veil, larger); benign ones are small, round and evenly brown; several lesions per
    patient; some hairs. Prepare it with `melanogan prepare --source siim-isic-2020=OUT`.
    """
    from melanogan.data.demo import generate_demo_dataset

    table = generate_demo_dataset(out, n_images=n_images, melanoma_rate=melanoma_rate, seed=seed,
                                  width=width, height=height)
    console.print(f"Wrote {len(table)} images ({int(table['target'].sum())} melanoma, "
                  f"{table['patient_id'].nunique()} patients) to {out}")


@app.command()
def prepare(
    source: Annotated[list[str], typer.Option(
        "--source", help="KIND=PATH, repeatable. KIND: siim-isic-2020, isic-2019, ham10000, derm7pt, folder.")],
    out: Annotated[Path, typer.Option("--out", help="DATA_DIR to write manifest.parquet, rejected.csv, "
                                      "near_duplicates.csv, prepare.json and cache/ into.")],
    size: Annotated[int, typer.Option(help="Cached image side in pixels (models resize from it).")] =
        CacheOptions.size,
    resize_mode: Annotated[str, typer.Option(
        help="crop (centre square), squash, pad, or lesion (a square around the lesion found by segmentation).")] =
        str(CacheOptions.resize_mode),
    hair_removal: Annotated[bool, typer.Option("--hair-removal/--no-hair-removal",
                                               help="DullRazor-style hair removal: the dark lines "
                                                    "--hair-method finds are inpainted (README).")] = \
        CacheOptions.hair_removal,
    hair_method: Annotated[str, typer.Option(
        help="With --hair-removal: lines (long thin dark lines only) or blackhat (every thin dark structure, "
             "pigment network and dots included: the only mask before this option, for reproducing older runs).")] =
        str(CacheOptions.hair_method),
    color_constancy: Annotated[bool, typer.Option(
        "--color-constancy/--no-color-constancy",
        help="Shades of Gray colour constancy (p=6): the largest measured factor in how a model does on other "
             "clinics' images (recommended, on by default).")] = CacheOptions.color_constancy,
    white_level: Annotated[int, typer.Option(
        help="Exposure normalisation: scale each image so that its illuminant's grey level (Shades of Gray's "
             "estimate) is this value, 16..255; 0 keeps the exposure as captured (the default: 180 passed on one "
             "split and did not replicate on two more, README).")] =
        CacheOptions.white_level,
    clahe: Annotated[float, typer.Option(
        help="Local contrast equalisation, after exposure: CLAHE on the lightness (8x8 tiles) with this clip "
             "limit, 1..40 (2 is usual in dermoscopy); 0 keeps the contrast as captured (the default: at 2 it "
             "did not travel better on two splits, README).")] = CacheOptions.clahe,
    train: Annotated[float, typer.Option(help="Training fraction.")] = SplitFractions.train,
    val: Annotated[float, typer.Option(help="Validation fraction.")] = SplitFractions.val,
    test: Annotated[float, typer.Option(help="Test fraction.")] = SplitFractions.test,
    seed: Annotated[int, typer.Option(help="Split seed.")] = 0,
    workers: Annotated[int, typer.Option(help="Decoding processes (0: one per core, up to 8).")] = 0,
    melanoma_folders: Annotated[str, typer.Option(
        help="For `folder` sources: comma-separated folder names that mean melanoma.")] =
        ",".join(DEFAULT_MELANOMA_FOLDERS),
    phash_distance: Annotated[int, typer.Option(
        help="Max perceptual-hash bit distance (of 256) for two images to count as the same photograph "
             "(calibrated on ../shared/data).")] = DEFAULT_PHASH_DISTANCE,
) -> None:
    """Read dataset sources into one leak-free manifest and a decoded uint8 image cache.

    Every image is decoded once at reduced size (JPEG DCT scaling), EXIF-rotated, converted to RGB
    and cached. Unusable rows go to rejected.csv with a reason. Near-duplicates (same photograph
    resized, or the same ISIC id in two sources) and patient/lesion groups are kept in one split.
    Re-running keeps existing split assignments and resumes an interrupted run.
    """
    from melanogan import api

    t0 = time.perf_counter()
    result = api.prepare(source, out, size=size, resize_mode=resize_mode, hair_removal=hair_removal,
                         hair_method=hair_method, color_constancy=color_constancy, white_level=white_level, clahe=clahe,
                         train=train, val=val, test=test,
                         seed=seed, workers=workers, melanoma_folders=melanoma_folders, phash_distance=phash_distance)
    _print_prepare_summary(result, time.perf_counter() - t0)


def _print_prepare_summary(result, seconds: float) -> None:
    m, rej = result.manifest, result.rejected
    table = Table(title=f"prepared {result.data_dir} in {seconds:.1f}s")
    for col in ("source", "kept", "melanoma", "other", "unlabeled", "rejected"):
        table.add_column(col, justify="right" if col != "source" else "left")
    for src in sorted(set(m["source"]) | set(rej["source"].dropna())):
        ms = m[m["source"] == src]
        table.add_row(src, str(len(ms)), str(int((ms["label"] == 1).sum())), str(int((ms["label"] == 0).sum())),
                      str(int((ms["label"] == -1).sum())), str(int((rej["source"] == src).sum())))
    console.print(table)
    if len(rej):
        reasons = rej["reason"].value_counts()
        console.print("rejected by reason: " + ", ".join(f"{r} {n}" for r, n in reasons.items())
                      + f"  (details: {result.data_dir / 'rejected.csv'})")
    splits = m[m["label"] >= 0].groupby("split")["label"].agg(["size", "sum"])
    console.print("splits: " + ", ".join(f"{s} {int(r['size'])} ({int(r['sum'])} melanoma, "
                                          f"{r['sum'] / max(r['size'], 1):.1%})" for s, r in splits.iterrows()))
    from melanogan.data.skin import category_counts

    tones = category_counts(m["ita_category"])
    console.print("skin tone (ITA of the skin around the lesion): "
                  + ", ".join(f"{name} {n}" for name, n in tones.items()))
    nd = result.near_duplicates
    console.print(f"near-duplicate pairs: {len(nd)} (kept in one split; {result.data_dir / 'near_duplicates.csv'})")
    for note in result.notes:
        console.print(f"note: {note}")
    console.print(f"cache: {result.cache_dir} ({result.cache_size}px uint8, "
                  f"{(result.cache_dir / 'pixels.npy').stat().st_size / 1e6:.1f} MB)")


@app.command()
def audit(
    data_dir: Annotated[Path, typer.Argument(help="A DATA_DIR written by `melanogan prepare`.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON here.")] = None,
) -> None:
    """Check a prepared dataset for leakage and report the melanoma rate per split.

    Fails (exit 1) if any patient/lesion group, near-duplicate cluster or identical file is in two
    splits, or if synthetic images are outside train.
    """
    from melanogan import api
    from melanogan.fileio import write_json

    report = api.audit(data_dir)
    table = Table(title=f"audit of {data_dir}")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail")
    for row in report.checks.itertuples():
        table.add_row(row.check, "[green]pass[/green]" if row.passed else "[red]FAIL[/red]", row.detail)
    console.print(table)
    splits = Table(title="per split")
    for col in ("split", "images", "melanoma", "rate", "groups"):
        splits.add_column(col, justify="right")
    for row in report.per_split.itertuples():
        splits.add_row(str(row.split), str(int(row.images)), str(int(row.melanoma)), f"{row.melanoma_rate:.2%}",
                       str(int(row.groups)))
    console.print(splits)
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    if json_out:
        write_json(json_out, report.as_dict)
    if not report.passed:
        raise typer.Exit(1)


@app.command()
def pack(
    data_dir: Annotated[Path, typer.Argument(help="A DATA_DIR written by `melanogan prepare`.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for manifest.parquet, images.npz and pack.json.")],
    size: Annotated[int, typer.Option(help="Pixels per side: the GAN resolution it is for.")] = 128,
    quality: Annotated[int, typer.Option(help="JPEG quality (4:4:4); 90 is ~5 KB per 128 px image.")] = 90,
) -> None:
    """Shrink a DATA_DIR to copy it to another machine (e.g. to train the GAN on a GPU box).

    Keeps the manifest unchanged (so the GAN records the same manifest hash) and the cached pixels
    resized as the GAN's input preset resizes them, JPEG-encoded. `melanogan unpack` turns it back
    into a DATA_DIR there.
    """
    from melanogan import api

    info = api.pack(data_dir, out, size=size, quality=quality)
    console.print(f"packed {info['images']} images at {size} px (JPEG {quality}): {info['bytes'] / 2**20:.1f} MiB "
                  f"in {out}")


@app.command()
def unpack(
    pack_dir: Annotated[Path, typer.Argument(help="A folder written by `melanogan pack`.")],
    out: Annotated[Path, typer.Option("--out", help="DATA_DIR to write.")],
) -> None:
    """Turn a pack back into a DATA_DIR (its prepare.json says the pixels are a lossy copy)."""
    from melanogan import api

    console.print(f"DATA_DIR: {api.unpack(pack_dir, out)}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo data, prepared data and the study.")] = Path(
        "melanogan-demo"),
    n_images: Annotated[int, typer.Option("--n-images", help="Number of demo images.")] = 600,
    seeds: Annotated[str, typer.Option(help="Comma-separated study seeds (each adds a GAN and every arm).")] = "0",
) -> None:
    """Run the main job end to end on generated demo data, in minutes on a CPU.

    1. generate a phantom dataset (OUT/raw, SIIM-ISIC 2020 layout); 2. prepare it (OUT/data);
    3. audit it for leakage; 4. run a small study (OUT/study): a conditional WGAN-GP on the training
    split, synthetic melanomas, and every default arm (the recommended baseline, weighted loss,
    oversampling, GAN, the baseline without the resolution control) evaluated on the same test split;
    5. print where the report is. Re-running resumes and skips what is done.
    """
    from melanogan import api
    from melanogan.data.demo import generate_demo_dataset
    from melanogan.study.experiments import demo_study_config, run_study

    t0 = time.perf_counter()
    raw = out / "raw"
    if not (raw / "train.csv").is_file():
        console.print(f"[bold]1/4[/bold] generating {n_images} phantom images in {raw}")
        generate_demo_dataset(raw, n_images=n_images, seed=0)
    else:
        console.print(f"[bold]1/4[/bold] demo images already in {raw}")
    console.print(f"[bold]2/4[/bold] preparing {out / 'data'}")
    result = api.prepare([("siim-isic-2020", raw)], out / "data", size=128, seed=0)
    _print_prepare_summary(result, time.perf_counter() - t0)
    console.print(f"[bold]3/4[/bold] auditing {out / 'data'}")
    report = api.audit(out / "data")
    for row in report.checks.itertuples():
        console.print(f"  {'pass' if row.passed else 'FAIL'}  {row.check}: {row.detail}")
    if not report.passed:
        raise MelanoganError("the demo dataset failed its leakage audit; this is a bug, please report it.")
    console.print(f"[bold]4/4[/bold] running the study in {out / 'study'}")
    seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    path = run_study(demo_study_config(out / "data", seed_list), out / "study",
                     log=lambda m: console.print(f"  {m}"))
    console.print(f"done in {time.perf_counter() - t0:.0f}s. Report: {path} (and {path.with_suffix('.html')})")


@app.command("train-gan")
def train_gan_cmd(
    data_dir: Annotated[Path, typer.Argument(
        help="A DATA_DIR written by `melanogan prepare` (only its train split is used).")],
    out: Annotated[Path, typer.Option("--out", help="RUN_DIR for config, stats.jsonl, samples/ and checkpoints/.")],
    preset: Annotated[str, typer.Option(
        help="original (the study's model, with a correct critic) or default.")] = "default",
    config: Annotated[Path | None, typer.Option(help="YAML file overriding preset fields.")] = None,
    resolution: Annotated[int | None, typer.Option(help="Output resolution: 32, 64, 128 or 256.")] = None,
    steps: Annotated[int | None, typer.Option(
        help="Total generator steps. With --resume the run's own config is used; --steps can extend it.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Global batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed: same seed, same run (bitwise on CPU).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Steps between checkpoints.")] = None,
    sample_every: Annotated[int | None, typer.Option(help="Steps between sample grids.")] = None,
    log_every: Annotated[int | None, typer.Option(help="Steps between stats.jsonl records.")] = None,
    kid_every: Annotated[int | None, typer.Option(
        help="Steps between KID evaluations (kid.jsonl); keeps checkpoints/best-kid. 0 = off.")] = None,
    kid_features: Annotated[str | None, typer.Option(help="KID features: pixels or classifier:RUN_DIR.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue from the run's last checkpoint with the run's own settings (options given "
                         "that differ from them are named and not used; --steps can extend the run; another "
                         "--precision is used, said, and recorded in run.json's precision_history).")] = False,
    accelerator: Annotated[str, typer.Option(help="cpu, cuda, gpu, mps or auto.")] = "auto",
    devices: Annotated[int, typer.Option(help="Devices per node; more than one trains with DDP.")] = 1,
    num_nodes: Annotated[int, typer.Option(help="Machines (launch with torchrun or SLURM).")] = 1,
    precision: Annotated[str, typer.Option(
        help="auto (default, as `train`: bf16-mixed where the GPU or CPU runs bf16 natively, else 32), "
             "bf16-mixed, 32, or 16-mixed on GPUs without bf16; the gradient penalty is always fp32.")] = "auto",
    max_steps: Annotated[int | None, typer.Option(
        help="Stop this invocation after N steps (resumable), e.g. to time-box CPU sessions.")] = None,
    logger: Annotated[str | None, typer.Option(
        help="Also log to csv (RUN_DIR/csv/) or tensorboard (RUN_DIR/tensorboard/; pip install "
             "'melanogan[tensorboard]'); stats.jsonl is always written.")] = None,
) -> None:
    """Train the conditional WGAN-GP on the training split of DATA_DIR.

    Validation and test images never reach the generator. Checkpoints are safetensors; --resume
    continues bitwise-identically on CPU. NaN/inf losses or an exploding Wasserstein estimate stop
    the run with a message and keep the last good checkpoint.
    """
    from melanogan import api

    r = api.train_gan(data_dir, out, preset=preset, config=config, resolution=resolution, steps=steps,
                      batch_size=batch_size, lr=lr, seed=seed, checkpoint_every=checkpoint_every,
                      sample_every=sample_every, log_every=log_every, kid_every=kid_every, kid_features=kid_features,
                      resume=resume, accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                      precision=precision, max_steps=max_steps, logger=logger)
    for note in r.notes:
        console.print(f"note: {note}")
    state = "finished" if r.finished else "paused (resume with --resume)"
    console.print(f"GAN {state} at step {r.step}; trained on {r.training_images}. Run: {out}")


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="A RUN_DIR written by `melanogan train-gan`.")],
    out: Annotated[Path, typer.Option("--out", help="SYN_DIR for images/, manifest.parquet and its cache.")],
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 1000,
    label: Annotated[str, typer.Option(help="Class to generate: melanoma or other.")] = "melanoma",
    seed: Annotated[int, typer.Option(help="Seed: image i depends only on (seed, i).")] = 0,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help=(
        "Use the EMA generator when the run has one and it has forgotten its random start (else the raw one, "
        "said)."))] = True,
    checkpoint: Annotated[Path | None, typer.Option(help="A specific checkpoint folder (default: latest).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Generate synthetic images with a manifest in the real schema (source=synthetic, split=train).

    Images are written at the real data's cache size and cached with the same preprocessing, so
    `melanogan train --synthetic SYN_DIR` reads them like real ones; provenance (checkpoint hash,
    step, seed, noise index) is in every row. Calls with different --label add to the same SYN_DIR.
    """
    from melanogan import api

    manifest = api.generate(run_dir, out, n=n, label=label, seed=seed, ema=ema, checkpoint=checkpoint,
                            device=device).manifest
    console.print(f"{out}: {len(manifest)} synthetic images "
                  f"({int((manifest['label'] == 1).sum())} melanoma, {int((manifest['label'] == 0).sum())} other)")
    from melanogan.fileio import read_json

    used = read_json(Path(out) / "prepare.json").get("generator", "")
    if used.startswith("raw ("):  # asked for the EMA generator but it was not usable: say so
        console.print(f"[yellow]note:[/yellow] generator {used}")


@app.command("import-synthetic")
def import_synthetic_cmd(
    folder: Annotated[Path, typer.Argument(help="A folder of generated images (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", help="SYN_DIR to write (or add to).")],
    real: Annotated[Path, typer.Option("--real", help="The prepared real DATA_DIR: its preprocessing is applied.")],
    label: Annotated[str, typer.Option(help="Class of the images: melanoma or other.")] = "melanoma",
    workers: Annotated[int, typer.Option(help="Decoding processes (0: one per core, up to 8).")] = 0,
) -> None:
    """Turn images from any generator (StyleGAN2-ADA, a diffusion model, ...) into a SYN_DIR that
    evaluate-gan, train --synthetic and the study accept like `generate`'s output: manifest with
    provenance, split train, cached with the real data's preprocessing. Files that fail decoding are
    listed in SYN_DIR/rejected.csv; the rest are imported."""
    from melanogan import api

    result = api.import_synthetic(folder, out, real, label, workers)
    manifest, rejected = result.manifest, result.rejected
    console.print(f"{out}: {len(manifest)} synthetic images ({int((manifest['label'] == 1).sum())} melanoma, "
                  f"{int((manifest['label'] == 0).sum())} other); {rejected} file(s) rejected"
                  + (f" (see {out / 'rejected.csv'})" if rejected else ""))


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="A RUN_DIR written by `melanogan train`.")],
    inputs: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    out: Annotated[Path, typer.Option(
        "--out", help="CSV: path, probability, logit, decision, threshold, error.")] = Path("predictions.csv"),
    threshold: Annotated[str, typer.Option(
        help="val-youden, val-sens95 (chosen on the run's validation split) or a number.")] = "val-youden",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    site: Annotated[str | None, typer.Option(
        help="A site calibrated with `melanogan calibrate`: its temperature and thresholds instead of the "
             "validation ones.")] = None,
    tta: Annotated[int, typer.Option(
        help="Test-time augmentation: logits averaged over 1 (off), 2, 4 or 8 flips/90-degree rotations; the "
             "validation thresholds are chosen on scores made the same way.")] = 1,
    metadata_csv: Annotated[Path | None, typer.Option(
        help="For a run trained with --metadata: CSV with an `image` column (file name) and age, sex, site; images "
             "not listed are scored with metadata 'missing'.")] = None,
) -> None:
    """Melanoma probability and decision for images, with the training preprocessing. Unreadable files
    are listed in the CSV with their error; they never stop the run."""
    from melanogan import api

    table = api.predict(run_dir, inputs, out, threshold=threshold, batch_size=batch_size, site=site, tta=tta,
                        metadata_csv=metadata_csv, log=lambda m: err_console.print(f"note: {m}")).table
    bad = table[table["error"] != ""]
    console.print(f"{len(table) - len(bad)} image(s) scored, {int((table['decision'] == 'melanoma').sum())} above the "
                  f"{table['threshold_name'].iat[0]} threshold {table['threshold'].iat[0]:.3f}; {out}")
    for _, row in bad.iterrows():
        console.print(f"[yellow]skipped[/yellow] {row['path']}: {row['error']}")


@app.command()
def explain(
    run_dir: Annotated[Path, typer.Argument(help="A RUN_DIR written by `melanogan train`.")],
    image: Annotated[Path, typer.Argument(help="One dermoscopic image.")],
    out: Annotated[Path, typer.Option("--out", help="PNG with the Grad-CAM overlay.")] = Path("heatmap.png"),
    site: Annotated[str | None, typer.Option(
        help="A site calibrated with `melanogan calibrate`: its temperature and thresholds instead of the "
             "validation ones.")] = None,
) -> None:
    """Grad-CAM heat map of what drives the melanoma score, over the preprocessed image."""
    from melanogan import api

    r = api.explain(run_dir, image, out, site)
    console.print(f"{image}: melanoma probability {r.probability:.3f}; heat map {out}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A RUN_DIR written by `melanogan train`.")],
    format: Annotated[str, typer.Option("--format", help="onnx (needs melanogan[export]) or torchscript.")] = "onnx",
    out: Annotated[Path | None, typer.Option(help="Output file (default RUN_DIR/export/model.onnx|.pt).")] = None,
    site: Annotated[str | None, typer.Option(
        help="A site calibrated with `melanogan calibrate`: its temperature and thresholds instead of the "
             "validation ones.")] = None,
) -> None:
    """A deployable model whose outputs are checked against PyTorch (max |difference| <= 1e-4) before the
    file is kept; OUT.json records input shape, preprocessing and the validation thresholds."""
    from melanogan import api

    meta = api.export(run_dir, format, out, site).sidecar
    console.print(f"{meta['file']} ({format}); max |difference| vs PyTorch {meta['max_abs_difference_vs_pytorch']:.2e}")


@app.command()
def calibrate(
    run_dir: Annotated[Path, typer.Argument(help="A RUN_DIR written by `melanogan train`.")],
    data: Annotated[Path, typer.Option("--data", help="A prepared DATA_DIR with a labelled sample of the new site.")],
    site: Annotated[str, typer.Option("--site", help="The site's name (stored as RUN_DIR/sites/NAME/).")],
    split: Annotated[str, typer.Option(help="Which of the site's images: all (default), train, val or test.")] =
        "all",
    folds: Annotated[int, typer.Option(help="Folds for the cross-fitted estimate of what the thresholds give.")] = 5,
    adapt_batchnorm: Annotated[bool, typer.Option(
        help="First replace the model's batch-normalisation statistics by those of the site's images (AdaBN; "
             "labels not used; at least 32 images), stored with the site: --site NAME then scores with them.")] =
        False,
    adapt_layers: Annotated[int | None, typer.Option(
        help="With --adapt-batchnorm: adapt only the first N batch-normalisation layers the forward pass reaches "
             "(the shallow ones, which see the dermoscope's colour and illumination); default: all.")] = None,
    refit_head: Annotated[bool | None, typer.Option(
        "--refit-head/--no-refit-head",
        help="Refit the melanoma head (the last linear layer) on the labelled sample, anchored to the trained one "
             "(at least 20 melanomas and 20 others); every reported figure then comes from out-of-fold scores. "
             "Stored with the site: --site NAME then scores with it. Default: refit when the sample has 20 of "
             "each class, else keep the trained head (and say so); --no-refit-head: thresholds only.")] = None,
) -> None:
    """An operating point for a new site: temperature and thresholds (Youden, 95% sensitivity) chosen
    on a labelled sample of its own cases, with the sensitivity/specificity they should give there
    (cross-fitted, exact 95% CIs as wide as the sample is small). Use them with --site NAME in
    predict, explain, serve and export."""
    from melanogan import api
    from melanogan.classify.site_head import difference_ci

    r = api.calibrate(run_dir, data, site, split=split, folds=folds, adapt_batchnorm=adapt_batchnorm,
                      adapt_layers=adapt_layers, refit_head=refit_head,
                      log=lambda m: console.print(f"note: {m}")).result
    if r["batchnorm"]:
        b = r["batchnorm"]
        console.print(f"batch normalisation adapted to {b['adapted_on_images']} images of site {site} "
                      f"({len(b['adapted_layers'])} of {b['layers_of_model']} layers)")
    if r["head"]:
        h = r["head"]
        console.print(f"melanoma head refitted on {h['fitted_on_images']} images of site {site} (lambda {h['lambda']}, "
                      f"chosen by cross-validation; the trained head's ROC-AUC on them: "
                      f"{h['roc_auc_trained_head']:.3f}); the figures below are out-of-fold")
        for d in h.get("by_diagnosis") or []:
            console.print(f"  melanoma vs {d['diagnosis']} ({d['n_images']} images): ROC-AUC trained head "
                          f"{d['roc_auc_trained_head']:.3f}, refitted {d['roc_auc_refitted_head']:.3f}"
                          f"{difference_ci(d)}")
    console.print(f"site {site}: {r['n_images']} images ({r['n_melanoma']} melanoma), ROC-AUC {r['roc_auc']:.3f} "
                  f"[{r['roc_auc_ci95'][0]:.3f}, {r['roc_auc_ci95'][1]:.3f}], temperature {r['temperature']:.2f}")
    for name, t in r["thresholds"].items():
        e = r["expected"][name]
        console.print(f"  {name:11s} t={t:.3f}: expected sensitivity {e['sensitivity']:.3f} "
                      f"[{e['sensitivity_ci95'][0]:.3f}, {e['sensitivity_ci95'][1]:.3f}], specificity "
                      f"{e['specificity']:.3f} [{e['specificity_ci95'][0]:.3f}, {e['specificity_ci95'][1]:.3f}]")
    console.print(f"stored in {run_dir / 'sites' / site}; use --site {site}")


@app.command("evaluate-gan")
def evaluate_gan_cmd(
    syn_dir: Annotated[Path, typer.Argument(help="A SYN_DIR written by `melanogan generate`.")],
    real: Annotated[Path, typer.Option("--real", help="The prepared real DATA_DIR.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for quality.json and quality.html.")],
    split: Annotated[str, typer.Option(
        help="Real split that fidelity and diversity are measured against: val (default: images the GAN never "
             "saw), test, or train (rewards memorisation). Memorisation is always checked against train.")] = "val",
    features: Annotated[list[str] | None, typer.Option(
        help="Feature extractor, repeatable: pixels, inception, classifier:RUN_DIR (default pixels).")] = None,
    inception_weights: Annotated[str | None, typer.Option(
        help="Local Inception-v3 weights (torchvision state dict, safetensors, or the FID .pth file). Without it "
             "torchvision's weights are taken from the torch cache or downloaded.")] = None,
    pairs: Annotated[int, typer.Option(help="Random pairs for the MS-SSIM diversity estimate.")] = 200,
) -> None:
    """Are the synthetic images any good? FID, KID, precision/recall, density/coverage per class and
    extractor; diversity (MS-SSIM within synthetic vs within real); memorisation (every synthetic image
    closer to a training image than training images are to each other is listed)."""
    from melanogan import api

    result = api.evaluate_gan(syn_dir, real, out, split=split, features=features,
                              inception_weights=inception_weights, pairs=pairs).result
    for k, v in result["summary"].items():
        console.print(f"  {k}: {v}")
    console.print(f"report: {out / 'quality.html'}")


@app.command()
def train(
    data_dir: Annotated[Path, typer.Argument(help="A DATA_DIR written by `melanogan prepare`.")],
    out: Annotated[Path, typer.Option("--out", help="RUN_DIR for config, stats.jsonl, best/, last/, curves.png.")],
    model: Annotated[str, typer.Option(help="original-cnn, small-cnn, small-cnn-ibn (instance-batch "
                                       "normalisation), efficientnet_b0, resnet18, resnet50, vit_b_16.")] = "small-cnn",
    weights: Annotated[str | None, typer.Option(
        help="imagenet (torchvision's weights; downloaded when online) or a local .pth/.safetensors file. "
             "Default: from scratch.")] = None,
    image_size: Annotated[int, typer.Option(help="Model input size (resized from the cache).")] = 96,
    synthetic: Annotated[list[Path] | None, typer.Option(
        help="SYN_DIR from `melanogan generate`, repeatable: added to training only.")] = None,
    loss: Annotated[str, typer.Option(help="bce, weighted (pos_weight = negatives/positives) or focal.")] = "bce",
    sampler: Annotated[str, typer.Option(
        help="none, balanced (half melanoma per batch on average) or source (every training source drawn "
             "equally often).")] = "none",
    augment: Annotated[str, typer.Option(
        help="none, classic (flips, rotations, scale/crop, mild colour jitter) or strong (wider crops, "
             "strong colour/contrast/sharpness changes, blur: for images from other clinics). Default: classic "
             "(recommended).")] = "classic",
    color_augment: Annotated[str, typer.Option(
        help="Colour step of classic augmentation: rgb (brightness, contrast, saturation, hue) or lab (lightness, "
             "chroma and white-point shifts in CIELAB). Default: rgb (see README, Models that travel).")] = "rgb",
    style_augment: Annotated[str, typer.Option(
        help="none, randconv (each batch also filtered by a random convolution: colour and texture change, "
             "shapes stay), amplitude (each image given part of a batch partner's Fourier amplitude spectrum, its own "
             "phase kept) or mixstyle (early-feature statistics mixed between batch images); weight-free style "
             "randomisation. Default: none (see README, Models that travel).")] = "none",
    illumination_augment: Annotated[str, typer.Option(
        help="none or random (each batch lit by a random illumination field: a lens vignette with a shifted "
             "centre times a side-to-side gradient; batch augmentation only). Default: none (see README, Models "
             "that travel).")] = "none",
    crop_aspect: Annotated[float | None, typer.Option(
        help="The widest crop aspect ratio A of batch augmentation: drawn log-uniformly in [1/A, A] (a lesion up "
             "to A times narrower or wider), A in 1-2. Default: the preset's own range (classic 0.85-1.18, "
             "strong 0.75-1.33; see README, Models that travel).")] = None,
    grayscale: Annotated[float, typer.Option(
        help="The share of training images made grey (luminance in all three channels) after batch augmentation's "
             "colour step, 0-1; 0 = off. Default: 0 (see README, Models that travel).")] = 0.0,
    mixup: Annotated[float, typer.Option(
        help="Mixup's alpha: each training batch mixed with a shuffled copy of itself (lam ~ Beta(alpha, alpha)) "
             "and the losses mixed alike; 0 = off. Default: 0 (see README, Models that travel).")] = 0.0,
    coral: Annotated[float, typer.Option(
        help="Deep CORAL's weight: each training batch also pays for the difference between its training sources' "
             "feature means and covariances (needs two or more sources); 0 = off. Default: 0 (see README, Models "
             "that travel).")] = 0.0,
    excised_weight: Annotated[float, typer.Option(
        help="How often each excised benign training image (diagnosis confirmed by histopathology: HAM10000's "
             "dx_type 'histo') is drawn relative to the others; 1 = a plain shuffle. Default: 1 (see README, "
             "Models that travel).")] = 1.0,
    diagnosis_weight: Annotated[float | None, typer.Option(
        help="Weight of an auxiliary loss that also predicts each training image's own diagnosis (the "
             "manifest's `diagnosis`, per source; unknown ones ignored). 0 = off. Default: 0.5 (recommended) when "
             "the training split has 2 or more known diagnoses, else off.")] = None,
    diagnosis_vocabulary: Annotated[str, typer.Option(
        help="The diagnosis head's classes: source (each source's own diagnosis names, never merged) or shared "
             "(the groups all sources map to: HAM10000's seven). Default: source (see README, Models that "
             "travel).")] = "source",
    epochs: Annotated[int, typer.Option(help="Maximum epochs.")] = 30,
    max_minutes: Annotated[float | None, typer.Option(help="Stop after this many minutes, keeping the best.")] = None,
    max_steps: Annotated[int | None, typer.Option(
        help="Stop after this many optimisation steps (the schedule spans them): a budget that is the same on a "
             "fast and a slow machine.")] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 32,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (warm-up then cosine).")] = 2e-3,
    weight_decay: Annotated[float, typer.Option(
        help="AdamW's decoupled weight decay, 0-1. Default: 1e-4 (see README, Models that travel).")] = 1e-4,
    patience: Annotated[int, typer.Option(help="Epochs without better validation AUC before stopping.")] = 8,
    select: Annotated[str, typer.Option(
        help="Validation figure that picks the best epoch: auc (over the whole validation split) or "
             "worst_source_auc (the lowest among the training sources). Default: auc (see README, Models that "
             "travel).")] = "auc",
    weight_average: Annotated[str, typer.Option(
        help="none or ema (validate and keep an exponential moving average of the weights, decay --ema-decay). "
             "Default: none (see README, Models that travel).")] = "none",
    ema_decay: Annotated[float, typer.Option(help="Decay of the weight average (0.998: ~500 steps).")] = 0.998,
    seed: Annotated[int, typer.Option(help="Seed (deterministic on CPU).")] = 0,
    workers: Annotated[int | None, typer.Option(
        help="DataLoader worker processes. Default: 0 with batch augmentation, 1 with --per-image-augment.")] =
        None,
    batch_augment: Annotated[bool, typer.Option(
        "--batch-augment/--per-image-augment",
        help="Augment whole uint8 batches in the training process (default) or each image in "
             "the DataLoader (the torchvision presets).")] = True,
    precision: Annotated[str, typer.Option(help="auto (bf16-mixed where the GPU or CPU runs bf16 natively, else "
                                                "32), bf16-mixed, 32 or 16-mixed.")] = "auto",
    metadata: Annotated[str, typer.Option(
        help="Patient metadata joined to the image features: any of age,sex,site (from the manifest; missing "
             "values get their own code). Off by default; predict/serve then take it or use 'missing'.")] = "",
    accelerator: Annotated[str, typer.Option(help="cpu, cuda, gpu, mps or auto.")] = "auto",
    devices: Annotated[int, typer.Option(help="Devices; more than one trains with DDP.")] = 1,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue from RUN_DIR/last with the run's own settings (options given that differ from "
                         "them are named in a note and not used).")] = False,
    logger: Annotated[str | None, typer.Option(
        help="Also log to csv (RUN_DIR/csv/) or tensorboard (RUN_DIR/tensorboard/; pip install "
             "'melanogan[tensorboard]'); stats.jsonl is always written.")] = None,
) -> None:
    """Train a melanoma classifier; the best epoch by validation ROC-AUC is kept in RUN_DIR/best.

    Imbalance strategies combine: --loss weighted/focal, --sampler balanced, --augment classic and
    --synthetic SYN_DIR (a synthetic set that claims any split but train is refused).
    """
    from melanogan import api

    summary = api.train(data_dir, out, model=model, weights=weights, image_size=image_size, synthetic=synthetic,
                        loss=loss, sampler=sampler, augment=augment, color_augment=color_augment,
                        style_augment=style_augment, illumination_augment=illumination_augment,
                        crop_aspect=crop_aspect, grayscale=grayscale, mixup=mixup, coral=coral,
                        excised_weight=excised_weight, diagnosis_weight=diagnosis_weight,
                        diagnosis_vocabulary=diagnosis_vocabulary, epochs=epochs,
                        max_minutes=max_minutes, max_steps=max_steps, batch_size=batch_size, lr=lr,
                        weight_decay=weight_decay, patience=patience, select=select,
                        weight_average=weight_average, ema_decay=ema_decay, seed=seed, workers=workers,
                        batch_augment=batch_augment, precision=precision, metadata=metadata,
                        accelerator=accelerator, devices=devices, resume=resume, logger=logger).summary
    for note in summary.get("notes", []):
        console.print(f"note: {note}")
    figure = "AUC" if summary.get("select", "auc") == "auc" else "worst-source AUC"
    console.print(f"trained {summary['epochs']} epoch(s) ({summary['stopped_by']}), best validation {figure} "
                  f"{summary['best_val_auc']:.3f} at epoch {summary['best_epoch']}. Run: {out}")


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A RUN_DIR written by `melanogan train`.")],
    data: Annotated[Path | None, typer.Option(
        help="Another prepared DATA_DIR: an external test set (its images are preprocessed as the run's training "
             "data were, cached once inside it).")] = None,
    split: Annotated[str | None, typer.Option(
        help="test, val or all (all labeled real images of DATA_DIR). Default: test of the run's own data, all of "
             "another DATA_DIR.")] = None,
    temperature_scaling: Annotated[bool, typer.Option(
        "--temperature-scaling", help="Calibrate with a temperature fitted on validation.")] = False,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples (by patient/lesion group) for CIs.")] = 1000,
    out: Annotated[Path | None, typer.Option(
        help="Output folder (default RUN_DIR/eval-SPLIT, or RUN_DIR/eval-external-NAME-HASH-SPLIT for another "
             "DATA_DIR; -ttaN appended with --tta).")] = None,
    tta: Annotated[int, typer.Option(
        help="Test-time augmentation: logits averaged over 1 (off), 2, 4 or 8 flips/90-degree rotations, for the "
             "validation scores that choose the thresholds too.")] = 1,
) -> None:
    """Evaluate on real images: ROC/PR-AUC with grouped-bootstrap CIs; accuracy, precision, sensitivity,
    specificity, F1, balanced accuracy at 0.5 and at thresholds chosen on validation (Youden, 95%
    sensitivity); calibration (Brier, ECE, reliability diagram); per subgroup, and per diagnosis (which
    benign lesions it confuses with melanoma).
    Writes metrics.json (oracle operating points read off the test ROC kept apart and named so),
    predictions.csv, subgroups.csv, diagnoses.csv, roc.png, pr.png, scores.png, reliability.png."""
    from melanogan import api

    r = api.evaluate(run_dir, data=data, split=split, temperature_scaling=temperature_scaling, bootstrap=bootstrap,
                     out=out, tta=tta, log=lambda m: console.print(f"note: {m}")).metrics
    def f(x) -> str:  # metrics.json writes undefined values (one class, no positives) as null
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    lo, hi = r["roc_auc_ci95"]
    console.print(f"{r['split']} ({r['n_images']} images, {r['n_melanoma']} melanoma): ROC-AUC {f(r['roc_auc'])} "
                  f"[{f(lo)}, {f(hi)}], PR-AUC {f(r['pr_auc'])}")
    for name, m in r["thresholds"].items():
        console.print(f"  {name:11s} t={f(m['threshold'])}: sensitivity {f(m['sensitivity'])}, specificity "
                      f"{f(m['specificity'])}, precision {f(m['precision'])}")
    for source, m in r.get("by_source", {}).items():
        auc = f"ROC-AUC {f(m['roc_auc'])} [{f(m['roc_auc_ci95'][0])}, {f(m['roc_auc_ci95'][1])}]" \
            if m["roc_auc"] is not None and not math.isnan(m["roc_auc"]) else "one class only"
        console.print(f"  source {source}: {m['n_images']} images, {m['n_melanoma']} melanoma, {auc}")
    small = [g for g in r["by_subgroup"] if g["note"]]
    console.print(f"  subgroups ({', '.join(sorted({g['variable'] for g in r['by_subgroup']}))}): "
                  f"{len(r['by_subgroup'])}, {len(small)} too small for an AUC; {Path(r['out']) / 'subgroups.csv'}")
    # the benign diagnoses the model separates worst from melanoma (metrics.json writes NaN as null)
    rated = sorted((d for d in r.get("by_diagnosis", []) if d["roc_auc_vs_melanoma"] is not None),
                   key=lambda d: d["roc_auc_vs_melanoma"])
    if rated:
        worst = "; ".join(f"{d['diagnosis']} ({d['n_images']}): ROC-AUC {f(d['roc_auc_vs_melanoma'])}, "
                          f"{d['called_melanoma']:.0%} called melanoma" for d in rated[:3])
        console.print(f"  hardest against melanoma: {worst}; {Path(r['out']) / 'diagnoses.csv'}")
    console.print(f"written to {r['out']}")


@app.command()
def card(
    run_dir: Annotated[Path, typer.Argument(help="A RUN_DIR written by `melanogan train` (evaluate it first).")],
    out: Annotated[Path | None, typer.Option(help="Output path without suffix (default RUN_DIR/model_card).")] = None,
) -> None:
    """Write a model card (markdown + html) from what the run and its evaluations measured: intended use,
    training data make-up, preprocessing, metrics with CIs (internal and external), subgroups, calibration,
    failure modes found, synthetic data and its quality, and the reporting items (Model Cards, TRIPOD+AI,
    CLAIM) it covers."""
    from melanogan import api

    result = api.card(run_dir, out)
    console.print(f"model card: {result.markdown} and {result.html}")


@app.command()
def study(
    config: Annotated[Path, typer.Argument(help="Study YAML: data, arms, seeds, classifier, gan, n_synthetic.")],
    out: Annotated[Path, typer.Option("--out", help="STUDY_DIR for every run and report.md/report.html.")],
) -> None:
    """Run the comparison the original study made, done right: for each seed one GAN (training split
    only) and every arm (baseline, weighted-loss, oversample, classic-aug, gan, gan+classic-aug, ...),
    all evaluated on the same real test split; report with paired tests and verdicts.
    Interrupted studies resume, skipping finished runs."""
    from melanogan import api

    api.study(config, out, log=lambda m: console.print(f"[bold]study[/bold] {m}"))


@app.command()
def serve(
    run: Annotated[Path, typer.Option("--run", help="RUN_DIR of a trained classifier (its best checkpoint).")],
    synthetic: Annotated[Path | None, typer.Option(
        help="SYN_DIR from `melanogan generate`: turns on the visual Turing test (needs real images).")] = None,
    real: Annotated[Path | None, typer.Option(
        help="Prepared DATA_DIR of real images for the Turing test and the review of its test split. "
             "Default: the data the run was trained on, if present.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind. Keep 127.0.0.1 unless others must reach it.")] =
        "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    db: Annotated[Path, typer.Option(help="SQLite file with reviewers' answers (created if absent).")] =
        Path("review.sqlite"),
    threshold: Annotated[str, typer.Option(help="Decision threshold: val-youden, val-sens95 or a number.")] =
        "val-youden",
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload, in MB.")] = 20.0,
    turing_per_class: Annotated[int, typer.Option(
        help="Real and synthetic images per class in the Turing test (the same ones on every start).")] = 200,
    review_items: Annotated[int, typer.Option(help="Test images offered for prediction review.")] = 200,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    site: Annotated[str | None, typer.Option(
        help="A site calibrated with `melanogan calibrate`: its temperature and thresholds instead of the "
             "validation ones.")] = None,
    admin_token: Annotated[str | None, typer.Option(
        help="Organiser token for the results pages and CSVs (default: a new random one each start, printed "
             "below). Reviewers never see it.")] = None,
    allowed_host: Annotated[list[str] | None, typer.Option(
        help="A further Host name clients use to reach the server, repeatable (requests naming any other host "
             "are refused). Needed with --host 0.0.0.0.")] = None,
) -> None:
    """Web app for using the model and collecting human judgements: predict (upload -> probability,
    decision, Grad-CAM), a blinded visual Turing test of real vs synthetic images with per-reviewer
    accuracy and 95% CIs, and a review of test predictions (agree/disagree, own diagnosis). Answers are
    kept in the SQLite --db and survive restarts; results export as CSV. Stop with Ctrl+C."""
    import uvicorn

    from melanogan.serve.app import LOOPBACK_HOSTS, ServeConfig, create_app

    if max_upload_mb <= 0 or turing_per_class <= 0 or review_items <= 0:
        raise MelanoganError("--max-upload-mb, --turing-per-class and --review-items must be positive.")
    if host in ("0.0.0.0", "::") and not allowed_host:
        raise MelanoganError(f"--host {host} serves every address of this machine: name the host name(s) clients "
                             "will use with --allowed-host NAME (requests for unknown names are refused).")
    if host not in LOOPBACK_HOSTS:
        err_console.print(f"[yellow]warning:[/yellow] binding to {host}: anyone who can reach this address can "
                          "upload images and answer; only the results need the organiser token.")
    application = create_app(ServeConfig(run_dir=run, db=db, synthetic_dir=synthetic, real_dir=real,
                                         threshold=threshold, max_upload_mb=max_upload_mb,
                                         turing_per_class=turing_per_class, review_items=review_items, device=device,
                                         site=site,
                                         admin_token=admin_token, host=host, allowed_hosts=tuple(allowed_host or ())))
    token = application.state.review.admin_token
    base = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    console.print(f"serving {run} on {base}  (answers in {db})")
    console.print(f"organiser results (keep private): {base}/turing/results?token={token}  and  "
                  f"{base}/review/results?token={token}")
    uvicorn.run(application, host=host, port=port, log_level="warning")


def _print_bench(results: dict, json_out: Path | None) -> None:
    """A benchmark's figures as JSON on the console, and in `json_out` when given."""
    from melanogan.fileio import write_json

    console.print_json(json.dumps(results, default=str))
    if json_out:
        write_json(json_out, results)


@bench_app.command("preprocess")
def bench_preprocess(
    n_images: Annotated[int, typer.Option("--n-images", help="Full-size 6000x4000 JPEGs to generate.")] = 64,
    size: Annotated[int, typer.Option(help="Cache size.")] = 256,
    workers: Annotated[int, typer.Option(help="Processes for both paths.")] = 2,
    read_size: Annotated[int, typer.Option(help="Model input size for the cache-read figure.")] = 224,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures here.")] = None,
) -> None:
    """Decode speed of our preprocessing vs a naive full decode + resize, and cache read speed."""
    from melanogan.bench.preprocess import run

    results = run(n_images=n_images, size=size, workers=workers, read_size=read_size)
    _print_bench(results, json_out)


@bench_app.command("classifier")
def bench_classifier(
    tf_python: Annotated[str | None, typer.Option(
        help="Python of a TensorFlow venv: also runs ../shared/bench/seed_tf.py cnn 224 in this invocation.")] = None,
    shared: Annotated[Path, typer.Option(help="The shared folder (bench/ and data/).")] = Path("../shared"),
    auc_minutes: Annotated[float | None, typer.Option(
        help="Also train the recommended model this many minutes on HAM10000 and report held-out and "
             "external AUC.")] = None,
    model: Annotated[str, typer.Option(help="Recommended from-scratch model.")] = "small-cnn",
    image_size: Annotated[int, typer.Option(help="Its input size.")] = 128,
    diagnosis_weight: Annotated[float, typer.Option(
        help="Its auxiliary diagnosis loss weight for the AUC run (0 = off).")] = 0.5,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures here.")] = None,
) -> None:
    """Training img/s of original-cnn at 224px (batch 32; NCHW fp32, channels_last, + bf16) and of the
    recommended model; optionally the AUC it reaches in a CPU-time budget, internal and external."""
    from melanogan.bench.classifier import run

    results = run(tf_python, shared, auc_minutes, model, image_size, diagnosis_weight)
    _print_bench(results, json_out)


@bench_app.command("serve")
def bench_serve(
    run: Annotated[Path | None, typer.Option(
        "--run", help="RUN_DIR to serve. Default: a small model trained on demo phantoms first.")] = None,
    n_images: Annotated[int, typer.Option(help="JPEGs in the folder given to `predict`.")] = 200,
    width: Annotated[int, typer.Option(help="Their width in pixels.")] = 1024,
    height: Annotated[int, typer.Option(help="Their height in pixels.")] = 768,
    requests: Annotated[int, typer.Option(help="Requests in the load test (an upper bound).")] = 200,
    concurrency: Annotated[int, typer.Option(help="Concurrent clients on localhost.")] = 4,
    max_seconds: Annotated[float, typer.Option(help="Time bound of each load test.")] = 60.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures here.")] = None,
) -> None:
    """`predict` throughput on a folder (images/s) and POST /api/predict latency (median, p95) under a
    bounded concurrent load from localhost, without and with Grad-CAM."""
    from melanogan.bench.serve import run as run_bench

    results = run_bench(run, n_images, width, height, requests, concurrency, max_seconds)
    _print_bench(results, json_out)


@bench_app.command("calibrate")
def bench_calibrate(
    shared: Annotated[Path, typer.Option(help="The shared folder (data/ham10000_224, data/derm7pt_384).")] =
        Path("../shared"),
    minutes: Annotated[float, typer.Option(help="Training budget of the default classifier on HAM10000.")] = 10.0,
    sizes: Annotated[str, typer.Option(help="Comma-separated site sample sizes.")] = "25,50,100,200,400",
    repeats: Annotated[int, typer.Option(help="Resamples per size.")] = 200,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures here.")] = None,
) -> None:
    """How many labelled local cases a new site needs: the default model trained on HAM10000, scored on
    Derm7pt (never trained on); what the validation threshold gives there, and the spread of the
    operating point chosen on site samples of each size (applied to the site's other cases)."""
    from melanogan.bench.calibrate import run

    results = run(shared, minutes, tuple(int(s) for s in sizes.split(",")), repeats)
    _print_bench(results, json_out)


@bench_app.command("augment")
def bench_augment(
    n_images: Annotated[int, typer.Option(help="Demo phantoms to train on.")] = 1536,
    image_size: Annotated[int, typer.Option(help="Model input size.")] = 128,
    cache_size: Annotated[int, typer.Option(help="Cache size the images are augmented from.")] = 256,
    batch: Annotated[int, typer.Option(help="Batch size.")] = 32,
    model: Annotated[str, typer.Option(help="Registered classifier.")] = "small-cnn",
    epochs: Annotated[int, typer.Option(help="Epochs per training run (the best after the first counts).")] = 3,
    precision: Annotated[str, typer.Option(help="auto (bf16-mixed where the CPU runs bf16 natively, else 32), "
                                                "bf16-mixed or 32.")] = "auto",
    augment: Annotated[str, typer.Option(help="The preset both paths apply: classic or strong.")] = "classic",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures here.")] = None,
) -> None:
    """Training img/s of the model alone, of a `train` run with per-image augmentation in a worker, and
    with batch augmentation in the training process; each as a share of the model-only figure."""
    from melanogan.bench.augment import run

    results = run(n_images, image_size, cache_size, batch, model, epochs, precision, augment)
    _print_bench(results, json_out)


@bench_app.command("travel")
def bench_travel(
    shared: Annotated[Path, typer.Option(help="The shared folder (data/ with the three sources).")] =
        Path("../shared"),
    minutes: Annotated[float, typer.Option(help="Training budget per held-out source.")] = 8.0,
    holdout: Annotated[str, typer.Option(help="Comma-separated sources to hold out in turn.")] =
        "ham10000,isic9,derm7pt",
    model: Annotated[str, typer.Option(help="Registered classifier.")] = "small-cnn",
    weights: Annotated[str | None, typer.Option(help="imagenet or a local weights file (pretrained recipe).")] =
        None,
    image_size: Annotated[int, typer.Option(help="Model input size.")] = 96,
    batch_size: Annotated[int, typer.Option(help="Training batch size (raise it on a GPU).")] = 32,
    seed: Annotated[int, typer.Option(help="Split and training seed.")] = 0,
    accelerator: Annotated[str, typer.Option(help="cpu, cuda, gpu, mps or auto.")] = "auto",
    vary: Annotated[list[str] | None, typer.Option(help=(
        "A lever KEY=VALUE (repeatable): resize_mode, color_constancy, hair_removal, hair_method (joined to "
        "hair_removal=true with +), white_level (exposure normalisation), clahe (local contrast), image_size, augment, "
        "color_augment, style_augment, illumination_augment, crop_aspect, grayscale, mixup, coral, excised_weight, "
        "diagnosis_weight, "
        "diagnosis_vocabulary (source or shared), sampler, loss (bce, weighted or focal), "
        "model (another "
        "architecture, from scratch), "
        "select, weight_average, minutes, epochs (an epoch count "
        "with train's early stopping instead of the clock), patience (with epochs: N or off), ensemble (N runs "
        "sharing the budget), gan=N (a GAN trained on the training sources, N synthetic images of each class "
        "added; +gan_steps=S, +gan_resolution=R, +gan_preset=cpu|default), tta, adapt=batchnorm (the "
        "defaults' model adapted to the site's choose part, "
        "as calibrate --adapt-batchnorm; +adapt_layers=N only its first N layers) or adapt=head (its melanoma head "
        "refitted on the choose part's labelled images, as calibrate --refit-head); settings that belong together "
        "are joined by + (epochs=30+patience=off). "
        "Each variant is compared with the defaults by a paired bootstrap on the same report images, "
        "Holm-adjusted."))] = None,
    repeats: Annotated[int, typer.Option(help=(
        "Train every variant this many times (training seeds seed, seed+1000, ...; the same splits) and also "
        "compare each lever over all of them: a single run moves by up to 0.03 AUC."))] = 1,
    match_steps: Annotated[bool, typer.Option(
        "--match-steps", help="Every lever that trains stops at the defaults' step count (same held-out source and "
        "seed) instead of its own clock, so that the machine's speed from run to run does not count as the "
        "lever's effect; its cost shows in its minutes. Refused with the budget levers (minutes, epochs, "
        "patience, ensemble).")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures here.")] = None,
) -> None:
    """Leave one source out (HAM10000, ISIC 9-class, Derm7pt): train on two with the default pipeline,
    report ROC-AUC and the operating points on half of the third (the other half chooses the site
    threshold). `--model efficientnet_b0 --weights imagenet --image-size 256` runs the pretrained recipe."""
    from melanogan.bench.travel import case_mix_lines, diagnosis_lines, run, table

    results = run(shared, minutes, tuple(h for h in holdout.split(",") if h), model, weights, image_size, seed,
                  accelerator, tuple(vary or ()), json_out, batch_size, repeats, match_steps)
    _print_bench(results, json_out)
    console.print(table(results), markup=False, highlight=False, soft_wrap=True)
    by_diagnosis = diagnosis_lines(results)
    if by_diagnosis:
        console.print("\nWhich benign lesions each model confuses with melanoma at the held-out source:",
                      markup=False, highlight=False)
        console.print(by_diagnosis, markup=False, highlight=False, soft_wrap=True)
    at_training_mix = case_mix_lines(results)
    if at_training_mix:
        console.print("\nThe same scores with the site's benign images re-weighted to the training sources' case mix:",
                      markup=False, highlight=False)
        console.print(at_training_mix, markup=False, highlight=False, soft_wrap=True)
    from melanogan.bench.ledger import verdict_lines

    console.print(verdict_lines(results), markup=False, highlight=False, soft_wrap=True)


@bench_app.command("ledger")
def bench_ledger(
    files: Annotated[list[Path], typer.Argument(help="JSON files written by `bench travel --json`.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the ledger here.")] = None,
) -> None:
    """Every lever of the given `bench travel` comparisons judged by the README's decision rule
    (positive with all three sources held out, Holm-significant with one, internal AUC within the
    defaults' CI), settings measured on several splits followed across them (a pass stands only where it
    replicated), and the defaults' own external AUC from run to run. Reads saved figures only.
    E.g. `melanogan bench ledger docs/measurements/travel-*.json`."""
    from melanogan.bench.ledger import (
        control_noise,
        defaults_spread,
        ledger,
        ledger_table,
        load,
        replications,
        seed_noise,
    )

    results = load(files)
    if json_out:
        from melanogan.fileio import write_json

        write_json(json_out, {"levers": ledger(results), "replications": replications(results),
                              "defaults": defaults_spread(results),
                              "control_noise": control_noise(results), "seed_noise": seed_noise(results)})
    console.print(ledger_table(results), markup=False, highlight=False, soft_wrap=True)


@bench_app.command("quality")
def bench_quality(
    sizes: Annotated[str, typer.Option(help="Comma-separated image counts (real and synthetic each).")] = "1000,5000",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures here.")] = None,
) -> None:
    """Feature extraction + FID/KID/precision-recall/density-coverage/memorisation at several N: time and
    peak memory per N (each in its own process), and how they grow."""
    from melanogan.bench.quality import run

    results = run(tuple(int(s) for s in sizes.split(",")))
    _print_bench(results, json_out)


@bench_app.command("gan")
def bench_gan(
    batch: Annotated[int, typer.Option(help="Batch size.")] = 16,
    repeats: Annotated[int, typer.Option(help="Timed steps per setting (median reported).")] = 3,
    tf_python: Annotated[str | None, typer.Option(
        help="Python of a TensorFlow venv: also runs ../shared/bench/seed_tf.py gan BATCH in this invocation.")] = None,
    shared: Annotated[Path, typer.Option(help="The shared folder (bench/).")] = Path("../shared"),
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures here.")] = None,
) -> None:
    """Critic-step speed (img/s) of the `original` preset at 128px and `default` at 64px on the CPU,
    in NCHW fp32, channels_last fp32 and channels_last + bf16 autocast (penalty always fp32).
    Compare with `python ../shared/bench/seed_tf.py gan 16` run at the same time."""
    from melanogan.bench.gan import run

    results = run(batch=batch, repeats=repeats, tf_python=tf_python, shared=shared)
    _print_bench(results, json_out)


def main() -> None:
    """Entry point: user errors print a clear message and exit 2, never a traceback."""
    try:
        app()
    except MelanoganError as exc:
        err_console.print(f"[bold red]error:[/bold red] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
