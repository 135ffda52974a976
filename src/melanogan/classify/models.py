"""Classifier registry: `create_classifier(name, image_size=..., weights=...)`.

Every model is a backbone that maps an image to a feature vector plus a one-logit head, so
`forward_features` (the penultimate layer) serves as domain features for GAN quality metrics.

Weights: None (from scratch), "imagenet" (torchvision's published weights: downloaded to the usual
torch cache when online, a clear error saying to pass a file when offline), or a local file: a
torchvision state dict (.pth/.pt, read with `weights_only=True`) or .safetensors. Files are never
unpickled as code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from melanogan.errors import MelanoganError


class Classifier(nn.Module):
    """backbone (image -> features) + dropout + linear head (features -> one melanoma logit), and
    optionally a diagnosis head (features -> one logit per diagnosis): an auxiliary training target
    that inference never uses; and optionally patient metadata (data/metadata.py), embedded and
    joined to the image features before the melanoma head."""

    METADATA_EMBEDDING = 16

    def __init__(self, backbone: nn.Module, feature_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.dropout = dropout
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, 1))
        self.diagnosis_head: nn.Linear | None = None
        self.metadata_net: nn.Sequential | None = None

    def add_diagnosis_head(self, n_classes: int) -> None:
        self.diagnosis_head = nn.Linear(self.feature_dim, n_classes)

    def add_metadata(self, missing: torch.Tensor) -> None:
        """Take a metadata vector of len(missing) beside the image; `missing` is the all-missing code,
        used when a call gives no metadata (a buffer, rebuilt from the run's fields, not stored)."""
        width = self.METADATA_EMBEDDING
        self.metadata_net = nn.Sequential(nn.Linear(len(missing), width), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(self.feature_dim + width, 1))
        self.register_buffer("missing_metadata", missing.float().clone(), persistent=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor, metadata: torch.Tensor | None = None, with_diagnosis: bool = False,
                with_features: bool = False):
        """Melanoma logits (N,); with `with_diagnosis`, also the diagnosis logits (N, K); with
        `with_features`, (logits, diagnosis logits or None, the backbone's features (N, F)). Keywords
        of forward (not other methods) so that DDP's wrapper sees the call and syncs gradients.
        `metadata` (N, D) for a model trained with it; None means "missing" for every image."""
        features = self.backbone(x)
        joined = features
        if self.metadata_net is not None:
            if metadata is None or metadata.shape[-1] == 0:
                metadata = self.missing_metadata.expand(len(x), -1)
            joined = torch.cat([features, self.metadata_net(metadata.to(features.dtype))], dim=1)
        logits = self.head(joined).squeeze(1)
        if not (with_diagnosis or with_features):
            return logits
        diagnosis = None
        if with_diagnosis:
            if self.diagnosis_head is None:
                raise MelanoganError("this classifier has no diagnosis head (train with --diagnosis-weight > 0).")
            diagnosis = self.diagnosis_head(features)
        return (logits, diagnosis, features) if with_features else (logits, diagnosis)


class OriginalCNN(nn.Module):
    """The original study's Keras CNN: Conv 32/64/128 3x3 (valid) + MaxPool 2, Dense 128.

    MaxPool is applied before ReLU: the two commute (both monotone), and the ReLU then touches 4x
    fewer values, which is measurably faster on a CPU. Output = the 128-d Dense activations."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, side = 3, image_size
        for c_out in (32, 64, 128):
            layers += [nn.Conv2d(c_in, c_out, 3), nn.MaxPool2d(2), nn.ReLU(inplace=True)]
            c_in, side = c_out, (side - 2) // 2
        if side < 1:
            raise MelanoganError(f"image size {image_size} is too small for original-cnn (at least 22).")
        self.convs = nn.Sequential(*layers)
        self.dense = nn.Sequential(nn.Flatten(), nn.Linear(128 * side * side, 128), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.convs(x))


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class InstanceBatchNorm(nn.Module):
    """IBN-a (Pan et al., "Two at once: enhancing learning and generalization capacities via IBN-Net",
    ECCV 2018): the first half of the channels is normalised per image (InstanceNorm, affine), the rest
    over the batch (BatchNorm). Why: an image's per-channel feature statistics carry its appearance
    (a clinic's illumination, colour and contrast); normalising them away per image removes that from
    half the features, while the BatchNorm half keeps what the statistics say about the lesion.

    The instance half is computed in float32 whatever the autocast (a variance of bf16 values loses
    the small differences it is made of)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.half = channels // 2
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(self.half))
        self.bias = nn.Parameter(torch.zeros(self.half))
        self.bn = nn.BatchNorm2d(channels - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inst, batch = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        xf = inst.float()
        var, mean = torch.var_mean(xf, dim=(2, 3), keepdim=True, unbiased=False)
        normed = (xf - mean) * torch.rsqrt(var + self.eps) * self.weight.view(1, -1, 1, 1) \
            + self.bias.view(1, -1, 1, 1)
        return torch.cat([normed.to(x.dtype), self.bn(batch)], dim=1)


class SmallCNN(nn.Module):
    """A small modern CNN that trains well from scratch on a CPU: four stages of two 3x3 conv-BN-ReLU
    blocks (32-64-128-256 channels), max-pooling between stages, global average pooling.

    `ibn_stages`: stages (0-based) whose first block normalises with InstanceBatchNorm (IBN-a) instead
    of BatchNorm. IBN-Net puts it in the shallow stages, where appearance lives, never the last."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), ibn_stages: tuple[int, ...] = ()) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        c_in = widths[0]
        for i, w in enumerate(widths):
            first = _conv_bn(c_in, w)
            if i in ibn_stages:
                first[1] = InstanceBatchNorm(w)
            layers += first + _conv_bn(w, w)
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# torchvision models: constructor, weights enum name, attribute holding the ImageNet head.
_TORCHVISION = {
    "efficientnet_b0": ("efficientnet_b0", "EfficientNet_B0_Weights", "classifier"),
    "resnet18": ("resnet18", "ResNet18_Weights", "fc"),
    "resnet50": ("resnet50", "ResNet50_Weights", "fc"),
    "vit_b_16": ("vit_b_16", "ViT_B_16_Weights", "heads"),
}
_HEAD_PREFIXES = {"classifier": ("classifier.",), "fc": ("fc.",), "heads": ("heads.",)}


def _torchvision_backbone(name: str, image_size: int) -> tuple[nn.Module, int]:
    ctor_name, _, head_attr = _TORCHVISION[name]
    ctor = getattr(torchvision.models, ctor_name)
    if name == "vit_b_16":
        if image_size % 16:
            raise MelanoganError(f"vit_b_16 needs an image size divisible by 16, got {image_size}.")
        model = ctor(weights=None, image_size=image_size)
        dim = model.heads.head.in_features
    else:
        model = ctor(weights=None)
        head = getattr(model, head_attr)
        dim = head[-1].in_features if isinstance(head, nn.Sequential) else head.in_features
    setattr(model, head_attr, nn.Identity())
    return model, dim


def _imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Download (or take from the torch cache) torchvision's ImageNet weights for `name`."""
    _, enum_name, _ = _TORCHVISION[name]
    weights = getattr(torchvision.models, enum_name).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:  # URLError, socket errors, HTTP errors: all mean "not reachable"
        raise MelanoganError(
            f"could not get ImageNet weights for {name} ({type(exc).__name__}: {exc}). If this machine is offline, "
            f"download {weights.url} on a machine that is online and pass the file: --weights /path/to/"
            f"{weights.url.rsplit('/', 1)[-1]} (or put it in {torch.hub.get_dir()}/checkpoints/)."
        ) from exc


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file holding tensors only (never arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise MelanoganError(f"--weights {path}: file not found. Pass 'imagenet' or the path of a weights file.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MelanoganError(f"--weights {path}: cannot be read as a state dict of tensors ({exc}). melanogan "
                             "loads only .safetensors or torch state-dict files, never pickled models.") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MelanoganError(f"--weights {path}: not a state dict of tensors.")
    return state


def load_backbone_weights(model: Classifier, name: str, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load a torchvision-style (or our own full-model) state dict; ImageNet heads are dropped; any
    other missing, unexpected or mis-shaped layer is an error that names them."""
    if any(k.startswith("backbone.") for k in state):
        # a diagnosis head belongs to the run that trained it (its classes), not to the weights reused
        target, prefix_free = model, {k: v for k, v in state.items() if not k.startswith("diagnosis_head.")}
    else:
        head_attr = _TORCHVISION.get(name, (None, None, ""))[2]
        drop = _HEAD_PREFIXES.get(head_attr, ())
        prefix_free = {k: v for k, v in state.items() if not k.startswith(drop)}
        target = model.backbone
    own = target.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in prefix_free.items()
                  if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in prefix_free and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in prefix_free if k not in own]
    if mismatched or missing or unexpected:
        parts = []
        if mismatched:
            parts.append(f"shape mismatch in {len(mismatched)} layer(s): {'; '.join(mismatched[:5])}")
        if missing:
            parts.append(f"{len(missing)} layer(s) missing from the file: {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected layer(s) in the file: {', '.join(unexpected[:5])}")
        raise MelanoganError(f"weights from {origin} do not fit {name}: " + "; ".join(parts)
                             + ". Is the file for this architecture?")
    target.load_state_dict(prefix_free, strict=False)


def _build(name: str, image_size: int) -> Classifier:
    if name == "original-cnn":
        return Classifier(OriginalCNN(image_size), 128, dropout=0.5)
    if name == "small-cnn":
        backbone = SmallCNN()
        return Classifier(backbone, backbone.out_dim, dropout=0.2)
    if name == "small-cnn-ibn":
        # stages 2 and 3 (32 and 16 px maps at 128 px input), not 1 as IBN-Net-a also does: on 2 CPU cores
        # the instance half costs 16% of training throughput in stages 2-3 and 33% in stages 1-3
        # (per-image statistics at 64 px), and under a clock budget epochs are what a from-scratch model
        # lacks most. An option, not the default: under leave-one-source-out it changed external AUC by
        # +0.058, -0.006, +0.011 on one split and -0.009, -0.018 on another (README, "Models that travel").
        backbone = SmallCNN(ibn_stages=(1, 2))
        return Classifier(backbone, backbone.out_dim, dropout=0.2)
    backbone, dim = _torchvision_backbone(name, image_size)
    return Classifier(backbone, dim, dropout=0.2)


_BUILDERS: dict[str, Callable[[int], Classifier]] = {
    name: (lambda size, _n=name: _build(_n, size))
    for name in ["original-cnn", "small-cnn", "small-cnn-ibn", *_TORCHVISION]
}
PRETRAINABLE = tuple(_TORCHVISION)


def list_classifiers() -> list[str]:
    return list(_BUILDERS)


def create_classifier(name: str, image_size: int = 128, weights: str | Path | None = None,
                      diagnosis_classes: int = 0, metadata: list[str] | tuple = ()) -> Classifier:
    """Build a registered classifier; `weights` None, 'imagenet', or a local file path;
    `diagnosis_classes` > 0 adds an auxiliary diagnosis head (freshly initialised); `metadata`
    fields (age, sex, site) add the metadata input."""
    if name not in _BUILDERS:
        raise MelanoganError(f"unknown model {name!r}; registered: {', '.join(_BUILDERS)}.")
    model = _BUILDERS[name](image_size)
    if weights is not None and weights != "none":
        _load_weights(model, name, weights)
    if diagnosis_classes:
        model.add_diagnosis_head(diagnosis_classes)
    if metadata:
        from melanogan.data.metadata import missing_vector

        model.add_metadata(torch.from_numpy(missing_vector(list(metadata))))
    return model


def _load_weights(model: Classifier, name: str, weights: str | Path) -> None:
    if str(weights) == "imagenet":
        if name not in PRETRAINABLE:
            raise MelanoganError(f"{name} has no published ImageNet weights; --weights imagenet applies to "
                                 f"{', '.join(PRETRAINABLE)}. A file saved from this same model can be passed.")
        load_backbone_weights(model, name, _imagenet_state_dict(name), "ImageNet (torchvision)")
    else:
        load_backbone_weights(model, name, read_weights_file(Path(weights)), str(weights))
