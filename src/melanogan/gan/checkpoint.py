"""GAN checkpoints: safetensors weights + torch optimiser state + JSON, written atomically.

A checkpoint folder carries everything needed to rebuild the models (the resolved config) and to
resume bitwise (weights, buffers, EMA, optimiser moments, step). Randomness is derived from
(seed, step, rank), so no RNG state needs saving. Optimiser state is loaded with
`torch.load(weights_only=True)`: tensors and plain containers only, never arbitrary pickled code.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from melanogan.errors import MelanoganError
from melanogan.fileio import read_json, write_json
from melanogan.gan.config import GanConfig
from melanogan.gan.models import create_critic, create_generator

LATEST = "latest.json"


def build_models(cfg: GanConfig) -> tuple[nn.Module, nn.Module]:
    """Generator and critic exactly as `cfg` describes them."""
    g = create_generator(cfg.arch, resolution=cfg.resolution, noise_dim=cfg.noise_dim, num_classes=2,
                         base_channels=cfg.generator_channels, kernel_size=cfg.kernel_size, norm=cfg.generator_norm)
    d = create_critic(cfg.arch, resolution=cfg.resolution, num_classes=2, base_channels=cfg.critic_channels,
                      kernel_size=cfg.kernel_size, norm=cfg.critic_norm)
    return g, d


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_checkpoint(run_dir: Path, step: int, cfg: GanConfig, generator: nn.Module, critic: nn.Module,
                    generator_ema: nn.Module | None, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                    extra: dict | None = None, name: str | None = None) -> Path:
    """Write `checkpoints/step-NNNNNNN/` (via a temporary folder + rename) and point latest.json at it.
    With `name` (e.g. "best-kid"), write `checkpoints/NAME/` instead, leaving latest.json alone."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / (name or f"step-{step:07d}")
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    meta = {"step": str(step), "preset": cfg.preset}
    save_file(_state(generator), tmp / "generator.safetensors", metadata=meta)
    save_file(_state(critic), tmp / "critic.safetensors", metadata=meta)
    if generator_ema is not None:
        save_file(_state(generator_ema), tmp / "generator_ema.safetensors", metadata=meta)
    torch.save({"generator": opt_g.state_dict(), "critic": opt_d.state_dict()}, tmp / "optimizers.pt")
    # ema_warmup: the EMA decay warmed up (train.ema_decay_at); checkpoints without it used `ema_decay` throughout
    write_json(tmp / "state.json", {"step": step, "config": cfg.model_dump(mode="json"), "ema_warmup": True,
                                    **(extra or {})})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if name is None:
        write_json(root / LATEST, {"step": step, "path": final.name})
        _prune(root, cfg.keep_checkpoints)
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        path = root / read_json(pointer)["path"]
        if (path / "state.json").is_file():
            return path
    complete = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return complete[-1] if complete else None


def _load_weights(module: nn.Module, path: Path) -> None:
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise MelanoganError(f"{path}: cannot read the weights ({exc}); the checkpoint is damaged. "
                             "Delete this checkpoint folder to fall back to the previous one.") from exc
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MelanoganError(f"{path}: weights do not match the model (missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}); was the checkpoint written with another config?")


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint folder into {'step', 'config', 'generator', 'critic', 'generator_ema', 'optimizers'}."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise MelanoganError(f"{path}: not a melanogan GAN checkpoint (state.json missing).")
    try:
        state = read_json(path / "state.json")
        cfg = GanConfig(**state["config"])
    except Exception as exc:
        raise MelanoganError(f"{path / 'state.json'}: unreadable checkpoint state ({exc}).") from exc
    g, d = build_models(cfg)
    _load_weights(g, path / "generator.safetensors")
    if (path / "critic.safetensors").is_file():
        _load_weights(d, path / "critic.safetensors")
    else:  # a sampling copy (e.g. brought back from a GPU machine without the critic): cannot resume training
        d = None
    g_ema = None
    if (path / "generator_ema.safetensors").is_file():
        g_ema, _ = build_models(cfg)
        _load_weights(g_ema, path / "generator_ema.safetensors")
    optimizers = None
    if (path / "optimizers.pt").is_file():
        try:
            optimizers = torch.load(path / "optimizers.pt", map_location="cpu", weights_only=True)
        except Exception as exc:
            raise MelanoganError(f"{path / 'optimizers.pt'}: cannot read optimiser state ({exc}).") from exc
    return {"step": int(state["step"]), "config": cfg, "generator": g, "critic": d, "generator_ema": g_ema,
            "optimizers": optimizers, "state": state, "path": path}


def checkpoint_hash(path: Path) -> str:
    """Short hash of a checkpoint's generator weights (provenance of synthetic images)."""
    h = hashlib.sha256()
    for name in ("generator_ema.safetensors", "generator.safetensors"):
        f = Path(path) / name
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()[:16]
