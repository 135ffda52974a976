"""`melanogan generate`: synthetic images + a manifest the classifier can consume directly.

SYN_DIR/
  images/*.png        generator output resized to the real data's cache size
  manifest.parquet    rows in the real manifest's schema with source=synthetic, split=train, label,
                      and provenance (checkpoint, its hash, step, seed, noise index, generator)
  prepare.json, cache/  a decoded cache with the real data's preprocessing options, so the
                      classifier reads synthetic images exactly as it reads real ones
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from melanogan import __version__
from melanogan.data.cache import CacheOptions, build_cache
from melanogan.data.manifest import MANIFEST
from melanogan.data.pack import data_space
from melanogan.data.synthetic import (
    SYNTHETIC_FORMAT,
    SYNTHETIC_SOURCE,
    check_same_decoding,
    parse_label,
    synthetic_decode_options,
    synthetic_rows,
)
from melanogan.data.transforms import bicubic_upsample
from melanogan.errors import MelanoganError
from melanogan.fileio import atomic_path, read_json, write_json, write_parquet
from melanogan.gan.checkpoint import checkpoint_hash, latest_checkpoint, load_checkpoint
from melanogan.gan.train import ema_initial_share, step_seed


def noise_for(index: int, seed: int, noise_dim: int) -> torch.Tensor:
    """The noise vector of synthetic image `index`: depends only on (seed, index), never on batching."""
    g = torch.Generator().manual_seed(step_seed(seed, index, 0, 424242))
    return torch.randn(noise_dim, generator=g)


EMA_MAX_INITIAL_SHARE = 0.01  # an EMA generator still holding more of its random start than this is not used


def choose_generator(loaded: dict, use_ema: bool = True) -> tuple[torch.nn.Module, str]:
    """The EMA generator when asked for and it has forgotten its random initialisation (less than
    EMA_MAX_INITIAL_SHARE of its weights), else the raw one; returns (model, description)."""
    cfg, ema = loaded["config"], loaded["generator_ema"]
    if not use_ema or ema is None:
        return loaded["generator"], "raw"
    share = ema_initial_share(cfg.ema_decay, loaded["step"], warmup=bool(loaded["state"].get("ema_warmup")))
    if share > EMA_MAX_INITIAL_SHARE:
        return loaded["generator"], (f"raw (the EMA generator still held {share:.0%} of its random initial weights "
                                     f"after {loaded['step']} steps at decay {cfg.ema_decay})")
    return ema, "ema"


def generate(run_dir: Path, n: int, label: str, out: Path, seed: int = 0, use_ema: bool = True,
             batch_size: int = 64, checkpoint: Path | None = None, device: str = "cpu") -> pd.DataFrame:
    """Generate `n` images of one class from a GAN run; returns the synthetic manifest."""
    run_dir, out = Path(run_dir), Path(out)
    if n <= 0:
        raise MelanoganError(f"--n must be positive, got {n}.")
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if ckpt is None:
        raise MelanoganError(f"{run_dir}: no GAN checkpoint found. Train one with `melanogan train-gan` first.")
    loaded = load_checkpoint(ckpt)
    cfg = loaded["config"]
    y = parse_label(label)
    if y not in cfg.classes:
        raise MelanoganError(f"the generator in {run_dir} did not learn class {label!r} (it learned "
                             f"{', '.join(str(c) for c in cfg.classes)}).")
    model, generator_note = choose_generator(loaded, use_ema)
    which = "ema" if model is loaded["generator_ema"] else "raw"
    model = model.to(device).eval()
    run_info = read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    data_dir = Path(run_info.get("data_dir", ""))
    if run_info.get("data_space"):  # recorded at training: holds also for a GAN trained on another machine
        options = CacheOptions.from_dict(run_info["data_space"])
    elif (data_dir / "prepare.json").is_file():
        options = data_space(data_dir)
    else:
        options = CacheOptions(size=cfg.resolution)
    size = options.size
    check_same_decoding(out, synthetic_decode_options(options))  # before any image is written
    ck_hash = checkpoint_hash(ckpt)
    tag = f"{ck_hash[:8]}-s{seed}-{'mel' if y else 'oth'}"
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            z = torch.stack([noise_for(i, seed, cfg.noise_dim) for i in idx]).to(device)
            labels = torch.full((len(idx),), y, dtype=torch.long, device=device)
            imgs = model(z, labels).float().clamp(-1, 1).add(1).mul(127.5).round().byte().cpu()
            for i, img in zip(idx, imgs, strict=True):
                pil = bicubic_upsample(img.permute(1, 2, 0).numpy(), size)
                image_id = f"syn-{tag}-{i:06d}"
                path = image_dir / f"{image_id}.png"
                with atomic_path(path, suffix=".png") as tmp:
                    pil.save(tmp, format="PNG")
                rows.append({"image_id": image_id, "path": str(path.resolve()), "noise_index": i})
    table = pd.DataFrame(rows)
    table["uid"] = SYNTHETIC_SOURCE + ":" + table["image_id"]
    # The generator learned the real cache's pixels, colour constancy and hair removal included: its
    # images are already in that space, and applying either again would shift them away from it.
    decode = synthetic_decode_options(options)
    cache_root = out / "cache" / decode.name
    cache = build_cache(cache_root, table[["uid", "path"]], decode)
    facts = cache.index.set_index("uid")
    bad = facts[facts["status"] != "ok"]
    if len(bad):
        raise MelanoganError(f"{len(bad)} generated image(s) could not be cached: {bad['detail'].iloc[0]}")
    table = table.join(facts[["width", "height", "content_hash", "phash"]], on="uid")
    manifest = synthetic_rows(table, y, str(ckpt), checkpoint_hash=ck_hash, checkpoint_step=loaded["step"], seed=seed,
                              generator=which)
    existing = out / MANIFEST
    if existing.is_file():  # several `generate` calls (e.g. per class) accumulate in one SYN_DIR
        old = pd.read_parquet(existing)
        manifest = pd.concat([old[~old["uid"].isin(manifest["uid"])], manifest], ignore_index=True)
        if len(manifest) != len(old) + len(table) - old["uid"].isin(table["uid"]).sum():
            raise MelanoganError(f"{existing}: inconsistent synthetic manifest; use a new --out.")
        cache = build_cache(cache_root, manifest[["uid", "path"]], decode)
    write_parquet(existing, manifest)
    write_json(out / "prepare.json", {
        "melanogan_version": __version__, "kind": "synthetic", "synthetic_format": SYNTHETIC_FORMAT,
        "cache": str(cache_root.relative_to(out)),
        "cache_options": options.to_dict(), "decode_options": decode.to_dict(), "gan_run": str(run_dir.resolve()),
        "checkpoint": str(ckpt),
        "checkpoint_hash": ck_hash, "generator": generator_note,
        "trained_on_split": run_info.get("trained_on_split", "train"),
        "real_data_dir": str(data_dir), "counts": json.loads(manifest["label"].value_counts().to_json()),
    })
    return manifest
