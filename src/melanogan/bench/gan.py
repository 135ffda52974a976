"""`melanogan bench gan`: one cWGAN-GP critic step (generator forward, critic on real and fake,
gradient penalty, backward, Adam update), images/s, for several CPU execution settings.

The peer is the original study's TensorFlow step (`../shared/bench/seed_tf.py gan 16`)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import torch

from melanogan.gan.checkpoint import build_models
from melanogan.gan.config import load_config
from melanogan.gan.losses import critic_loss, gradient_penalty
from melanogan.gan.train import make_adam


def time_critic_step(preset: str, resolution: int | None, batch: int, channels_last: bool, bf16: bool,
                     repeats: int = 3) -> float:
    """Images/s of the critic step (median of `repeats` timed steps after one warm-up)."""
    cfg = load_config(preset, resolution=resolution, batch_size=batch)
    torch.manual_seed(0)
    g, d = build_models(cfg)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g, d = g.to(memory_format=fmt), d.to(memory_format=fmt)
    opt = make_adam(d, cfg)
    real = torch.rand(batch, 3, cfg.resolution, cfg.resolution).mul(2).sub(1).contiguous(memory_format=fmt)
    labels = torch.ones(batch, dtype=torch.long)

    def step() -> None:
        z = torch.randn(batch, cfg.noise_dim)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                fake = g(z, labels).float()
            scores = d(torch.cat([real, fake]), torch.cat([labels, labels])).float()
        gp = gradient_penalty(d, real, fake, labels)  # fp32, as in training
        loss = critic_loss(scores[:batch], scores[batch:]) + cfg.gp_lambda * gp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return batch / sorted(times)[len(times) // 2]


def run(batch: int = 16, repeats: int = 3, tf_python: str | None = None,
        shared: Path | None = Path("../shared")) -> dict:
    results: dict = {"batch": batch, "threads": torch.get_num_threads(), "torch": torch.__version__}
    if tf_python and shared:
        out = subprocess.run([tf_python, str(shared / "bench" / "seed_tf.py"), "gan", str(batch)], capture_output=True,
                             text=True, timeout=900)
        results["tf_peer"] = (out.stdout.strip().splitlines() or [out.stderr.strip()[-300:]])[-1]
    for label, preset, res in (("original_128px", "original", 128), ("default_64px", "default", 64)):
        for name, cl, bf16 in (("nchw_fp32", False, False), ("channels_last_fp32", True, False),
                               ("channels_last_bf16", True, True)):
            results[f"{label}_{name}_img_per_s"] = round(time_critic_step(preset, res, batch, cl, bf16, repeats), 2)
    return results
