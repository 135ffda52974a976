"""`melanogan bench augment`: what augmentation costs a training run, in one invocation.

Three figures for the same model, batch and precision: the model alone (a pre-made batch, forward +
backward + step), a real `train` epoch with per-image torchvision transforms in a DataLoader worker,
and one with `BatchAugment` on whole uint8 batches. Each run's share of the model-only throughput
is the figure to read: within a fixed CPU budget throughput is epochs."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch


def model_only(model_name: str, image_size: int, batch: int, steps: int, precision: str) -> float:
    from melanogan.classify.models import create_classifier

    torch.manual_seed(0)
    model = create_classifier(model_name, image_size).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch) < 0.5).float()
    bf16 = "bf16" in precision

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def run(n_images: int = 1536, image_size: int = 128, cache_size: int = 256, batch: int = 32,
        model: str = "small-cnn", epochs: int = 3, precision: str = "auto", augment: str = "classic") -> dict:
    from melanogan.classify.train import TrainConfig, loader_workers, train_classifier
    from melanogan.data.cache import CacheOptions
    from melanogan.data.demo import generate_demo_dataset
    from melanogan.data.manifest import prepare
    from melanogan.errors import MelanoganError

    if augment not in ("classic", "strong"):
        raise MelanoganError(f"--augment {augment!r}: compare 'classic' or 'strong'.")
    results: dict = {"model": model, "image_size": image_size, "cache_size": cache_size, "batch": batch,
                     "augment": augment, "precision": precision, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="melanogan-bench-augment-") as tmp:
        tmp = Path(tmp)
        generate_demo_dataset(tmp / "raw", n_images=n_images, melanoma_rate=0.2, seed=0, width=320, height=256)
        prepare([("siim-isic-2020", tmp / "raw")], tmp / "data", CacheOptions(size=cache_size), seed=0)
        results["model_only_img_per_s"] = round(model_only(model, image_size, batch, 30, precision), 1)
        for name, batch_augment in (("per_image_worker", False), ("batch_augment", True)):
            cfg = TrainConfig(model=model, image_size=image_size, batch_size=batch, epochs=epochs, patience=100,
                              augment=augment, batch_augment=batch_augment, diagnosis_weight=0,
                              precision=precision)  # each path with its default loader workers (1 and 0)
            train_classifier(tmp / "data", tmp / name, cfg, progress=False)
            records = [json.loads(x) for x in (tmp / name / "stats.jsonl").read_text().splitlines() if x.strip()]
            rate = max(r["img_per_s"] for r in records[1:] or records)  # the first epoch warms up
            results[f"{name}_img_per_s"] = rate
            results[f"{name}_loader_workers"] = loader_workers(cfg)
            results[f"{name}_share_of_model_only"] = round(rate / results["model_only_img_per_s"], 3)
    return results
