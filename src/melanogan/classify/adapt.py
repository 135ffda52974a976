"""Adapting batch normalisation to a new site (AdaBN: Li et al., "Revisiting batch normalization for
practical domain adaptation", 2016), on the site's own images, without labels.

Why: every BatchNorm layer centres and scales its channels by the mean and variance the training
images gave. A clinic with another dermoscope shifts those statistics (illumination, colour,
contrast), so its images arrive off-centre at every layer, and the shift compounds with depth.
Replacing the running statistics by the ones the site's images give re-centres each layer; the
learned weights stay as they were. `melanogan calibrate --adapt-batchnorm` does it on the site
sample and stores the statistics beside the site's thresholds (RUN_DIR/sites/NAME/), so `predict`,
`serve` and `export` with `--site NAME` score with them.

The statistics are pooled over every image exactly (sums in float64, each image counted once,
whatever the batch sizes); the forward pass that produces each layer's input normalises the layers
before it by the batch's own statistics, as in training, which is what AdaBN prescribes.

`layers=N` adapts only the first N layers in the order the forward pass reaches them (the shallow
ones). Why: a site's statistics carry its dermoscope (illumination, colour, contrast), which the first
layers see, and also its own mix of lesions, which the deep layers' features separate; re-centring
those on the site's mix can move the melanoma-vs-rest direction itself. A shallow layer's statistics
do not depend on the layers after it, so they are exactly those of a full adaptation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from melanogan.errors import MelanoganError

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# Fewer images than this give per-channel variances too noisy to replace the training ones with.
MIN_IMAGES = 32
BATCH = 64


def batchnorm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's BatchNorm layers that keep running statistics, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BATCHNORMS) and m.track_running_stats}


def batchnorm_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every BatchNorm layer's running mean and variance, keyed as in the model's state dict."""
    return {f"{name}.{buf}": getattr(m, buf).detach().cpu().clone()
            for name, m in batchnorm_layers(model).items() for buf in ("running_mean", "running_var")}


def even_batch_size(n: int, largest: int = BATCH) -> int:
    """A batch size <= `largest` that splits n images into batches differing by at most one image, so
    that no last batch of one or two images is normalised by its own (instance) statistics."""
    batches = max(1, math.ceil(n / largest))
    return math.ceil(n / batches)


def check_layers(layers: int | None, available: int, model_name: str) -> None:
    """`layers` (None: all) must name between 1 and the model's number of BatchNorm layers."""
    if layers is not None and not 1 <= layers <= available:
        raise MelanoganError(f"adapting the first {layers} batch-normalisation layer(s): {model_name} has "
                             f"{available}; use 1 to {available}, or leave the number out to adapt all.")


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
                    layers: int | None = None) -> tuple[int, list[str]]:
    """Replace the running mean and variance of the BatchNorm layers of `model` by those of the
    features the images of `batches` (items: images, metadata or None) produce at that layer; the
    variance unbiased, as BatchNorm stores it. `layers`: only the first N layers the forward pass
    reaches (None: every layer it reaches). Everything else of the model is left as it was.
    Returns the number of images and the adapted layers' names, in forward order."""
    found = batchnorm_layers(model)
    if not found:
        raise MelanoganError(f"{type(model).__name__} has no batch normalisation to adapt.")
    check_layers(layers, len(found), type(model).__name__)
    sums: dict[str, list] = {name: [0, 0.0, 0.0] for name in found}
    order: list[str] = []  # the forward pass's order, which the declaration order need not be

    def recorder(name: str):
        def hook(_module, inputs):
            if name not in order:
                order.append(name)
            x = inputs[0].detach().double()
            dims = [0, *range(2, x.dim())]
            s = sums[name]
            s[0] += x.numel() // x.shape[1]
            s[1] = s[1] + x.sum(dims)
            s[2] = s[2] + (x * x).sum(dims)
        return hook

    was_training = model.training
    saved = {name: (m.momentum, m.num_batches_tracked.clone()) for name, m in found.items()}
    hooks = [m.register_forward_pre_hook(recorder(name)) for name, m in found.items()]
    model.eval()
    for m in found.values():
        m.train()  # batch statistics normalise the forward pass, as in training ...
        m.momentum = 0.0  # ... and leave the running ones untouched until they are replaced below
    images = 0
    try:
        for x, meta in batches:
            images += len(x)
            if meta is None:
                model(x)
            else:
                model(x, meta)
    finally:
        for h in hooks:
            h.remove()
        for name, m in found.items():
            m.momentum, tracked = saved[name]
            m.num_batches_tracked.copy_(tracked)
        model.train(was_training)
    if images < 2:
        raise MelanoganError(f"adapting batch normalisation needs at least 2 images; got {images}.")
    # a layer the forward pass never reaches (an unused head) has no site statistics: it stays as trained
    chosen = order if layers is None else order[:layers]
    if layers is not None and len(chosen) < layers:
        raise MelanoganError(f"adapting the first {layers} batch-normalisation layer(s): the forward pass of "
                             f"{type(model).__name__} reaches only {len(order)}.")
    for name in chosen:
        m = found[name]
        n, s1, s2 = sums[name]
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0) * (n / (n - 1))
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
    return images, chosen


def dataset_batches(dataset, metadata: np.ndarray | None, device: torch.device, batch_size: int):
    """(images, metadata rows) batches of a dataset of (image, label) items, in order."""
    from torch.utils.data import DataLoader

    start = 0
    for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        meta = None if metadata is None else torch.as_tensor(metadata[start:start + len(x)]).to(device)
        start += len(x)
        yield x.to(device), meta


def load_statistics(model: nn.Module, stats: dict[str, torch.Tensor], origin: str) -> None:
    """Put stored BatchNorm statistics into `model`, refused unless they are exactly its layers'."""
    expected = batchnorm_statistics(model)
    wrong = sorted(set(expected) ^ set(stats)) or sorted(k for k in expected if stats[k].shape != expected[k].shape)
    if wrong:
        raise MelanoganError(f"{origin}: batch-normalisation statistics of another model ({wrong[0]} differs); "
                             "run `melanogan calibrate --adapt-batchnorm` for this run again.")
    buffers = dict(model.named_buffers())
    for key, value in stats.items():
        buffers[key].copy_(value.to(buffers[key].dtype))
