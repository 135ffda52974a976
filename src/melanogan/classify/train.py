"""Classifier training (Lightning Fabric), with the imbalance strategies the study compares.

RUN_DIR/
  config.yaml, run.json   resolved options; data, synthetic sets and their hashes
  stats.jsonl             one record per epoch (train/val loss, val AUC, lr, img/s)
  best/                   model.safetensors + state.json: the epoch with the best validation AUC
  last/                   model, optimiser and loop state for --resume
  curves.png              training curves
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torchvision.transforms import v2

from melanogan import __version__
from melanogan.classify import coral, mixup
from melanogan.classify.metrics import pr_auc, roc_auc, roc_auc_by_group
from melanogan.classify.mixstyle import MixStyle
from melanogan.classify.models import Classifier, create_classifier
from melanogan.data.batch_augment import AmplitudeMix, BatchAugment, RandomConvolution
from melanogan.data.dataset import CachedImageDataset
from melanogan.data.diagnoses import diagnosis_group
from melanogan.data.manifest import default_cache, load_manifest, manifest_hash
from melanogan.data.metadata import encode_metadata, missingness_warning
from melanogan.data.synthetic import check_synthetic_space
from melanogan.data.transforms import GeneratorResolution, eval_preset, train_preset
from melanogan.errors import MelanoganError
from melanogan.fileio import atomic_path, read_json, save_figure, write_json, write_text
from melanogan.runtime import RunLog, TrainingBar, ddp_strategy, fabric_loggers, fabric_precision, shutdown_distributed
from melanogan.runtime import not_used_note as _not_used_note


class TrainConfig(BaseModel):
    """Everything a classifier run depends on (stored in RUN_DIR/config.yaml and in checkpoints)."""

    model_config = ConfigDict(extra="forbid")

    model: str = "small-cnn"
    weights: str | None = None  # None, "imagenet" or a file path
    # 96, not 128: under leave-one-source-out (README, split seed 8000) the 1.7x throughput bought 1.6x
    # the epochs in the same CPU budget and travelled at least as well from every held-out source; 64
    # doubled the epochs again but travelled worse with HAM10000 held out (split seed 11000: +0.036,
    # -0.034, -0.002), so 96 stays
    image_size: int = 96
    epochs: int = 30
    max_minutes: float | None = None
    # A budget in optimisation steps (the schedule then spans them; the run may stop mid-epoch, as
    # the clock does): unlike --max-minutes it is the same on a fast and a slow machine, so two runs
    # compared at one step count saw the same number of images whatever each machine's speed was
    # (bench travel --match-steps). The epoch count and the clock still stop a run first if they end sooner.
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = 32
    # AdamW's peak learning rate and decoupled weight decay (applied to every parameter). Bounded so that
    # a typo (0, a negative decay, NaN) is refused here rather than read as a slow or diverging run.
    # Both are bench travel levers (README, "The options compared").
    lr: float = Field(2e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    warmup_fraction: float = 0.05
    loss: Literal["bce", "weighted", "focal"] = "bce"
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    # "balanced": half melanoma per batch on average (an imbalance strategy of the study); "source":
    # every training source drawn equally often (synthetic images keep their share), DomainBed's
    # per-domain balanced batches, so that the largest source does not set what the model learns.
    # none: under leave-one-source-out "source" changed external AUC by -0.027 (Holm-significant),
    # +0.018 and +0.000 (README, "Models that travel").
    sampler: Literal["none", "balanced", "source"] = "none"
    # classic by default: the recommended setting (README, "Models that travel").
    augment: Literal["none", "classic", "strong"] = "classic"
    # Augmentation of whole uint8 batches in the training process (BatchAugment, every preset) instead
    # of per-image transforms in DataLoader workers: same distribution, most of the time saved.
    batch_augment: bool = True
    # The colour step of classic batch augmentation: "rgb" (ColorJitter's brightness, contrast,
    # saturation, hue) or "lab" (lightness, chroma and a white-point shift in CIELAB, BatchAugment).
    # rgb: under leave-one-source-out over two training seeds lab helped with HAM10000 held out and
    # hurt with the ISIC set held out (README, "Models that travel"), so it fails the default rule.
    color_augment: Literal["rgb", "lab"] = "rgb"
    # Style randomisation on top of `augment`: "randconv" filters each training batch with a random
    # convolution (data/batch_augment.py); "amplitude" gives each image part of a batch partner's Fourier
    # amplitude spectrum, keeping its phase (data/batch_augment.py); "mixstyle" mixes early-feature
    # statistics between batch images (classify/mixstyle.py). none: under leave-one-source-out each
    # lost with at least one held-out source (amplitude with all three: -0.094, -0.039, -0.006;
    # README, "Models that travel"), so none passes the default rule.
    style_augment: Literal["none", "randconv", "amplitude", "mixstyle"] = "none"
    # "random": each training batch lit by a random illumination field after the geometry (a lens
    # vignette with a shifted centre times a side-to-side gradient, data/batch_augment.py), for
    # dermoscopes whose light falls off differently. none: under leave-one-source-out it changed external
    # AUC by -0.003, -0.014 and -0.002 at no cost in epochs (README, "Models that travel").
    illumination_augment: Literal["none", "random"] = "none"
    # The widest crop aspect ratio of batch augmentation: A draws it log-uniformly in [1/A, A], which
    # makes a lesion up to A times narrower or wider for its height (BatchAugment); None = the preset's
    # own range (classic 0.85-1.18, strong 0.75-1.33). Why a lever: HAM10000's and the ISIC set's shared
    # copies are squashed from 4:3 to a square and Derm7pt's are cropped (README, "Sources"), so a model
    # meets the other geometry at a held-out source; 4/3 covers that squash. None: under
    # leave-one-source-out (split 28000) 4/3 changed external AUC by -0.049 (HAM10000 held out,
    # Holm-significant, with 2 epochs fewer than the defaults), +0.012 (ISIC set) and +0.004 (Derm7pt);
    # at the defaults' step count (split 30000) +0.006, +0.005 and +0.000, none significant and inside
    # an identical-settings control's spread (README, "Models that travel").
    crop_aspect: float | None = Field(None, ge=1.0, le=2.0)
    # The share of training images made grey (their luminance in all three channels) after batch
    # augmentation's colour step (BatchAugment); 0 = off. Why a lever: dermoscopes and clinics differ
    # most in colour (hue casts, saturation), and a model that must find melanoma without colour on part
    # of its batches leans more on structure. Off: under leave-one-source-out at the defaults' step count
    # (split 31000) 0.2 changed external AUC by -0.043 (HAM10000 held out) and -0.026 (ISIC set), both
    # Holm-significant and beyond an identical-settings control's spread, and +0.018 (Derm7pt, n.s.)
    # (README, "Models that travel").
    grayscale: float = Field(0.0, ge=0.0, le=1.0)
    # Mixup's alpha (classify/mixup.py): each training batch mixed with a shuffled copy of itself,
    # lam ~ Beta(alpha, alpha), and the losses mixed alike; 0 = off. Off: under leave-one-source-out
    # 0.2 changed external AUC by +0.018 (Derm7pt), +0.072 (HAM10000, Holm-significant) and -0.009
    # (ISIC set, n.s.), failing "positive everywhere" (README, "Models that travel").
    mixup: float = Field(0.0, ge=0.0, le=10.0)
    # Deep CORAL's weight (classify/coral.py): each training batch also pays for the difference between
    # its training sources' feature means and covariances (every pair of sources with two or more images
    # in the batch; synthetic images are a source of their own); 0 = off. 1 is DomainBed's default.
    # Off: under leave-one-source-out (split 27000) 1 changed external AUC by -0.009 (HAM10000 held
    # out), -0.012 (ISIC set) and +0.003 (Derm7pt), none significant; with sampler 'source' (split
    # 29000) +0.000, -0.024 and +0.008 (README, "Models that travel").
    coral: float = Field(0.0, ge=0.0, le=100.0)
    # How often each excised benign training image (a diagnosis confirmed by histopathology: a lesion
    # that looked suspicious enough to cut out; HAM10000's dx_type 'histo') is drawn, relative to the
    # other images; 1 = a plain shuffle. Why: melanoma against an excised naevus is the pair no source
    # travels on (README, "why the held-out sources score what they score"), and most naevi in the
    # training data were confirmed by follow-up, easy negatives.
    excised_weight: float = Field(1.0, ge=1.0, le=20.0)
    synthetic: list[str] = Field(default_factory=list)
    patience: int = 8  # epochs without a better validation AUC before stopping
    # Which validation figure picks the best epoch (and drives early stopping): "auc", the ROC-AUC
    # over the whole validation split; "worst_source_auc", the lowest ROC-AUC among the training
    # sources' validation images (each source with both classes), a stand-in for a source not
    # trained on. auc: under leave-one-source-out the other changed external AUC by -0.006 and +0.003
    # (n.s., README, "Models that travel"), noisy where a source's validation part is small.
    select: Literal["auc", "worst_source_auc"] = "auc"
    # Weight averaging: "ema" keeps an exponential moving average of the weights (and BatchNorm
    # statistics) after every step; validation, best/ and everything downstream use the average.
    # Why: averaged weights sit in flatter minima, which transfer better to a domain not trained on
    # (SWA/SWAD, Izmailov et al. 2018, Cha et al. 2021). Off: under leave-one-source-out it changed
    # external AUC by +0.043, -0.035 and -0.015 (README, "Models that travel").
    weight_average: Literal["none", "ema"] = "none"
    # 0.998: a horizon of ~500 steps, 3-7 epochs of our two-source training sets at batch 32.
    ema_decay: float = Field(0.998, gt=0.0, lt=1.0)
    # Auxiliary target: each training image's own diagnosis (manifest `diagnosis`, per source),
    # weighted against the melanoma loss; 0 = off; None (default) = RECOMMENDED_DIAGNOSIS_WEIGHT when
    # the training split has at least 2 known diagnoses, else off (said in the run's notes). The
    # resolved weight and the classes are filled in when a run starts and recorded here, so that a
    # checkpoint rebuilds the same model.
    diagnosis_weight: float | None = Field(None, ge=0.0)
    # What the diagnosis head's classes are: "source", each source's own names (`ham10000:nv`,
    # `derm7pt:clark nevus`), so that no two sources' vocabularies are merged by guesswork; "shared",
    # the groups every source maps to (data/diagnoses.py: HAM10000's seven; "other" is no class).
    # Why "shared" could travel better: classes that never span two sources can only be told apart
    # by knowing the source, so the per-source head also rewards features that recognise the
    # dermoscope; a shared class (a naevus from either source) rewards what the lesions have in common.
    # source: under leave-one-source-out (split 20000) "shared" changed external AUC by -0.020, -0.086
    # (HAM10000 held out, Holm-significant) and -0.008; the shared groups are also coarser than the
    # sources' own names, which seem to be what teaches (README, "Models that travel").
    # Runs recorded before this option read as "source", what they were trained with.
    diagnosis_vocabulary: Literal["source", "shared"] = "source"
    diagnosis_classes: list[str] = Field(default_factory=list)
    # Real training images pass through a generator's resolution (down to it, then up as synthetic
    # images are upsampled): the study's `resolution: matched`, so that softness cannot mean melanoma.
    # Validation and test images never do. None: the cache's resolution.
    generator_resolution: int | None = Field(None, ge=8)
    seed: int = 0
    # DataLoader worker processes; None: 0 with batch augmentation (the loader only copies cached
    # uint8 images, and a worker would take a core from the model: measured 0.82 -> 0.93 of the
    # model-only throughput on 2 cores), 1 with per-image transforms.
    workers: int | None = Field(None, ge=0)
    precision: str = "auto"  # bf16 where the hardware runs it natively, else fp32 (runtime.auto_precision)
    # Patient metadata joined to the image features (data/metadata.py): any of age, sex, site.
    # Off by default: measured on ../shared/data in the README before anyone relies on it.
    metadata: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _lab_needs_batch_augment(self):
        if self.color_augment == "lab" and not (self.batch_augment and self.augment == "classic"):
            raise ValueError("color_augment 'lab' is the colour step of classic batch augmentation: use it with "
                             "augment 'classic' and batch augmentation on (not per-image or strong presets).")
        # settings only BatchAugment applies: refused where no batch augmentation runs
        batch_only = [name for name, on in (("illumination_augment 'random'", self.illumination_augment != "none"),
                                            (f"crop_aspect {self.crop_aspect}", self.crop_aspect is not None),
                                            (f"grayscale {self.grayscale}", self.grayscale > 0)) if on]
        if batch_only and not (self.batch_augment and self.augment != "none"):
            raise ValueError(f"{' and '.join(batch_only)}: a step of batch augmentation; use it with augment "
                             "'classic' or 'strong' and batch augmentation on (not --per-image-augment).")
        if self.excised_weight > 1 and self.sampler != "none":
            raise ValueError(f"excised_weight draws excised benign images more often in a weighted draw of its own; "
                             f"it cannot be combined with sampler {self.sampler!r}: use one of them.")
        if self.diagnosis_vocabulary != "source" and self.diagnosis_weight == 0:
            raise ValueError(f"diagnosis_vocabulary {self.diagnosis_vocabulary!r} names the diagnosis head's classes, "
                             "but diagnosis_weight 0 turns the head off: drop one of them.")
        if self.coral and self.mixup:
            # a mixed image's features belong to two sources at once: which source's moments are they?
            raise ValueError("coral compares each training source's features, and mixup makes images of two sources: "
                             "use coral or mixup, not both.")
        if self.mixup and self.metadata:
            # metadata codes (age band, sex, site) are categories: a mix of two has no meaning
            raise ValueError("mixup mixes images and labels, not categorical metadata: use mixup or metadata, "
                             "not both.")
        return self

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, v):
        from melanogan.data.metadata import parse_fields

        try:
            return parse_fields(v)
        except MelanoganError as exc:
            raise ValueError(str(exc)) from None


def check_synthetic_manifest(syn_dir: Path) -> pd.DataFrame:
    """A synthetic set may only ever add training rows: refuse one that claims val/test/other."""
    m = load_manifest(syn_dir)
    bad = m[m["split"] != "train"]
    if len(bad):
        raise MelanoganError(f"{syn_dir}: {len(bad)} synthetic row(s) claim split "
                             f"{', '.join(sorted(bad['split'].astype(str).unique()))}; synthetic images may only be "
                             "used for training. Regenerate them with `melanogan generate`.")
    if not m["label"].isin([0, 1]).all():
        raise MelanoganError(f"{syn_dir}: synthetic labels must be 0 or 1.")
    return m


UNKNOWN_DIAGNOSES = {"", "unknown", "nan", "none", "unlabeled"}
# Measured: external AUC +0.014 and +0.023 on two seeds, HAM10000 -> ISIC 9-class set; under
# leave-one-source-out (split 20000) turning the head off changed it by +0.004 (Derm7pt held out),
# -0.078 (HAM10000, Holm-significant) and -0.026 (ISIC set) (README, "Models that travel").
RECOMMENDED_DIAGNOSIS_WEIGHT = 0.5
IGNORE = -100  # diagnosis index of an image without a known diagnosis (synthetic ones included)


def _diagnosis_keys(rows: pd.DataFrame, vocabulary: str = "source") -> pd.Series:
    """Each row's diagnosis class under `vocabulary` (TrainConfig.diagnosis_vocabulary); NaN where
    the row has none (an unknown diagnosis; under "shared" also one of no group)."""
    diagnosis = rows["diagnosis"].fillna("").astype(str)
    known = ~diagnosis.str.strip().str.lower().isin(UNKNOWN_DIAGNOSES)
    if vocabulary == "shared":
        # "other" is no class: it gathers what one source names and the others do not (Derm7pt's
        # "melanosis", "miscellaneous"), so it would mark the source, which is what "shared" avoids.
        keys = diagnosis.map(diagnosis_group)
        known &= keys != "other"
    else:
        # fillna first: pandas 3 keeps a missing value missing through astype(str) (pandas 2 wrote "nan").
        keys = rows["source"].fillna("").astype(str) + ":" + diagnosis
    return keys.where(known)


def diagnosis_classes(train_rows: pd.DataFrame, vocabulary: str = "source") -> list[str]:
    """The diagnosis head's classes over the training rows: `source:diagnosis` ("source": sources
    name diagnoses differently, so they are not merged) or the shared groups ("shared"); unknown
    diagnoses are not a class."""
    return sorted(_diagnosis_keys(train_rows, vocabulary).dropna().unique())


class WithDiagnosis(Dataset):
    """(image, melanoma label, diagnosis index or IGNORE, metadata vector, source index) over a cached
    dataset; the metadata vector is empty for a run without metadata; `sources` gives each image's
    index among the training sources (all 0 when not given)."""

    def __init__(self, dataset: CachedImageDataset, classes: list[str], metadata: list[str] | None = None,
                 vocabulary: str = "source", sources: np.ndarray | None = None) -> None:
        index = {c: i for i, c in enumerate(classes)}
        self.dataset = dataset
        self.sources = np.zeros(len(dataset), np.int64) if sources is None else np.asarray(sources, np.int64)
        self.codes = _diagnosis_keys(dataset.rows, vocabulary).map(index).fillna(IGNORE).to_numpy(np.int64)
        self.metadata = torch.from_numpy(encode_metadata(dataset.rows, metadata or []))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, torch.Tensor, int]:
        x, y = self.dataset[i]
        return x, y, int(self.codes[i]), self.metadata[i], int(self.sources[i])


def diagnosis_loss(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the rows with a known diagnosis; 0 when a batch has none (the head
    still takes part in the graph, so DDP sees every parameter used)."""
    known = codes >= 0
    ce = F.cross_entropy(logits.float(), codes.clamp(min=0), reduction="none")
    return (ce * known).sum() / known.sum().clamp(min=1)


def build_datasets(data_dir: Path, cfg: TrainConfig) -> tuple[ConcatDataset, CachedImageDataset, np.ndarray]:
    """Training set (real train split + synthetic sets, train preset; items are (image, label,
    diagnosis index)) and validation set (eval preset)."""
    # With batch augmentation the datasets hand over the cached uint8 image and the loop augments.
    train_tf = torch.nn.Identity() if uses_batch_augment(cfg) else train_preset(cfg.image_size, cfg.augment)
    real_tf = v2.Compose([GeneratorResolution(cfg.generator_resolution), train_tf]) if cfg.generator_resolution \
        else train_tf  # synthetic images took that path when they were generated
    parts = [CachedImageDataset(data_dir, "train", transform=real_tf, labels=[0, 1])]
    data_options = default_cache(data_dir).options
    for syn in cfg.synthetic:
        manifest = check_synthetic_manifest(Path(syn))
        check_synthetic_space(Path(syn), data_options)
        parts.append(CachedImageDataset(syn, "train", transform=train_tf, manifest=manifest))
    val = CachedImageDataset(data_dir, "val", transform=eval_preset(cfg.image_size), labels=[0, 1])
    labels = np.concatenate([p.labels for p in parts])
    if labels.sum() == 0 or labels.sum() == len(labels):
        raise MelanoganError(f"{data_dir}: the training split needs both melanoma and other images.")
    if val.labels.sum() == 0 or val.labels.sum() == len(val.labels):
        raise MelanoganError(f"{data_dir}: the validation split needs both classes to choose the best epoch "
                             "and thresholds; re-run `melanogan prepare` with a larger --val fraction.")
    # each item's source as an index (CORAL compares sources within a batch)
    names = part_sources(parts)
    index = {name: i for i, name in enumerate(sorted(set(np.concatenate(names).tolist())))}
    return ConcatDataset([WithDiagnosis(p, cfg.diagnosis_classes, cfg.metadata, cfg.diagnosis_vocabulary,
                                        np.array([index[n] for n in part_names], np.int64))
                          for p, part_names in zip(parts, names, strict=True)]), val, labels


def row_sources(rows: pd.DataFrame) -> np.ndarray:
    """Each manifest row's `source` as a string; a missing one (or no column) counts as one unnamed source."""
    if "source" not in rows:
        return np.full(len(rows), "", dtype=object)
    return rows["source"].fillna("").astype(str).to_numpy(dtype=object)


def val_sources(val_set, cfg: TrainConfig) -> np.ndarray:
    """Each validation image's source (manifest `source`), for per-source AUCs; refuses
    select='worst_source_auc' when no source's validation images hold both classes."""
    rows = val_set.rows
    sources = row_sources(rows)
    if cfg.select == "worst_source_auc" and not roc_auc_by_group(val_set.labels, np.zeros(len(rows)), sources):
        counts = pd.crosstab(sources, np.asarray(val_set.labels)).to_dict("index")
        raise MelanoganError(f"select 'worst_source_auc' needs a training source whose validation images hold both "
                             f"classes; per source (label: count): {counts}. Use select 'auc' or re-run "
                             "`melanogan prepare` with a larger --val fraction.")
    return sources


def ema_decay_at(decay: float, n_averaged: int) -> float:
    """The decay of the update after `n_averaged` earlier ones, such that the average is
    sum_i decay^(n-i) w_i / sum_i decay^(n-i) over the weights w_1..w_n after each step (bias-corrected
    like Adam's moments): decay (1 - decay^n) / (1 - decay^(n+1)). Why: a plain EMA starts from the
    initial weights, which at 0.998 still weigh 0.998^500 = 37% after 500 steps, so a short run's
    average would be mostly the untrained network; in a long run (thousands of steps) the two agree
    to within decay^steps."""
    return decay * (1 - decay ** n_averaged) / (1 - decay ** (n_averaged + 1))


def ema_update(decay: float):
    """AveragedModel's multi_avg_fn: ema <- ema + (1 - d) (current - ema), d = ema_decay_at(decay, n);
    integer buffers (BatchNorm's batch counter) take the current value."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        d = ema_decay_at(decay, int(n_averaged))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 - d)
        else:
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    return update


def average_of(model: nn.Module, cfg: TrainConfig, resume_from: Path | None) -> AveragedModel | None:
    """The exponential moving average of `model`'s weights and buffers (cfg.weight_average 'ema'),
    continued from `resume_from`/last/ema.safetensors when resuming; None without weight averaging."""
    if cfg.weight_average == "none":
        return None
    ema = AveragedModel(model, multi_avg_fn=ema_update(cfg.ema_decay), use_buffers=True)
    if resume_from is not None:
        path = resume_from / "last" / "ema.safetensors"
        if not path.is_file():
            raise MelanoganError(f"{path} is missing: this run's weight average cannot go on. Train again without "
                                 "--resume (or with weight_average 'none').")
        ema.load_state_dict(load_file(path))
    return ema


def uses_batch_augment(cfg: TrainConfig) -> bool:
    return cfg.batch_augment


def loader_workers(cfg: TrainConfig) -> int:
    if cfg.workers is not None:
        return cfg.workers
    return 0 if uses_batch_augment(cfg) else 1


def loss_fn(cfg: TrainConfig, labels: np.ndarray):
    pos = float(labels.sum())
    pos_weight = torch.tensor((len(labels) - pos) / pos)

    def compute(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, y = logits.float(), y.float()
        if cfg.loss == "weighted":
            return F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight.to(logits.device))
        if cfg.loss == "focal":
            from torchvision.ops import sigmoid_focal_loss

            return sigmoid_focal_loss(logits, y, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma, reduction="mean")
        return F.binary_cross_entropy_with_logits(logits, y)

    return compute


@torch.no_grad()
def predict_logits(model: nn.Module, dataset, batch_size: int = 64, device: torch.device | None = None,
                   autocast: bool = False, workers: int = 0, tta: int = 1,
                   metadata: np.ndarray | None = None) -> np.ndarray:
    """Logits for every item of `dataset`, in order; `tta` > 1 averages them over flips/rotations.
    `metadata`: (N, D) rows aligned with `dataset`, for a model trained with metadata."""
    from melanogan.classify.tta import tta_logits

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    start = 0
    for x, _ in loader:
        x = x.to(device)
        if device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        meta = None if metadata is None else torch.as_tensor(metadata[start:start + len(x)]).to(device)
        start += len(x)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            scorer = model if meta is None else (lambda v, m=meta: model(v, m))
            out.append(tta_logits(scorer, x, tta).float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0)


def save_model(path: Path, model: Classifier, cfg: TrainConfig, extra: dict) -> None:
    """`path/model.safetensors` + `path/state.json` (config included: the model can be rebuilt)."""
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path / "model.safetensors", suffix=".safetensors") as tmp:
        save_file(state, tmp, metadata={"model": cfg.model})
    write_json(path / "state.json", {"config": cfg.model_dump(mode="json"), **extra})


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[Classifier, TrainConfig, dict]:
    """Rebuild a classifier from a `best/` or `last/` folder (no download: weights come from the file)."""
    path = Path(path)
    if not (path / "state.json").is_file() or not (path / "model.safetensors").is_file():
        raise MelanoganError(f"{path}: no trained classifier here (model.safetensors/state.json missing). "
                             "Train one with `melanogan train`.")
    state = read_json(path / "state.json")
    cfg = TrainConfig(**state["config"])
    model = create_classifier(cfg.model, cfg.image_size, diagnosis_classes=len(cfg.diagnosis_classes),
                              metadata=cfg.metadata)
    try:
        weights = load_file(path / "model.safetensors")
    except Exception as exc:
        raise MelanoganError(f"{path / 'model.safetensors'}: unreadable ({exc}).") from exc
    model.load_state_dict(weights)
    return model.to(device).eval(), cfg, state


def balanced_indices(labels: np.ndarray, generator: torch.Generator, rank: int = 0, world_size: int = 1) -> list[int]:
    """One epoch of indices drawn with replacement so that half are melanoma on average; under DDP
    every rank takes its own share of the same global draw (not the same batches on every rank)."""
    n_pos = int(labels.sum())
    w = np.where(labels == 1, 0.5 / max(n_pos, 1), 0.5 / max(len(labels) - n_pos, 1))
    return weighted_draw(w, generator, rank, world_size)


def weighted_draw(weights: np.ndarray, generator: torch.Generator, rank: int = 0, world_size: int = 1) -> list[int]:
    """One epoch of len(weights) indices drawn with replacement in proportion to `weights` (the draw
    WeightedRandomSampler makes). Under DDP every rank draws the same global sequence from the same
    seeded generator and keeps every world_size-th index from its rank on: disjoint shares of one draw,
    not the same batches on every rank."""
    drawn = torch.multinomial(torch.as_tensor(weights, dtype=torch.double), len(weights), replacement=True,
                              generator=generator)
    return drawn[rank::world_size].tolist()


# The group of synthetic training images in a source-balanced draw (never a real source's name).
SYNTHETIC_GROUP = "\0synthetic"


def part_sources(parts: list[CachedImageDataset]) -> list[np.ndarray]:
    """Each image's source, per part of `build_datasets`' training set: the real training split's
    manifest `source` (`row_sources`), then every synthetic set as SYNTHETIC_GROUP."""
    real, *synthetic = parts
    return [row_sources(real.rows)] + [np.full(len(p), SYNTHETIC_GROUP, dtype=object) for p in synthetic]


def training_sources(train_set: ConcatDataset) -> np.ndarray:
    """Each training item's source (`part_sources`), in the training set's order."""
    return np.concatenate(part_sources([p.dataset for p in train_set.datasets]))


def check_coral_sources(train_set: ConcatDataset, cfg: TrainConfig) -> None:
    """coral aligns training sources with each other: refuse a training set of one source, where the
    penalty would be 0 on every batch and the run a plain one under another name."""
    if not cfg.coral:
        return
    names = sorted(set(training_sources(train_set).tolist()))
    if len(names) < 2:
        raise MelanoganError(f"coral {cfg.coral:g} aligns the training sources' features, but every training image "
                             f"comes from one source ({names[0] or 'unnamed'!r}). Prepare two or more with "
                             "`prepare --source KIND=PATH` (repeated), or train with coral 0.")


def source_balanced_indices(sources: np.ndarray, generator: torch.Generator, rank: int = 0,
                            world_size: int = 1) -> list[int]:
    """One epoch of indices drawn with replacement so that every real training source is drawn equally
    often on average, however many images each holds; synthetic images (SYNTHETIC_GROUP) keep their
    share of the training set, so that balancing sources does not also change how much synthetic data
    the model sees. One source only: a uniform draw. Under DDP every rank takes its share of one draw."""
    sources = np.asarray(sources).astype(str)
    is_syn = sources == SYNTHETIC_GROUP
    real_share = 1.0 - is_syn.mean()
    names, counts = np.unique(sources[~is_syn], return_counts=True)
    per_image = dict(zip(names, real_share / (len(names) * counts), strict=True))
    per_image[SYNTHETIC_GROUP] = 1.0 / len(sources)  # each synthetic image as likely as under a uniform draw
    return weighted_draw(np.array([per_image[g] for g in sources]), generator, rank, world_size)


# The manifest column that says how a diagnosis was confirmed (HAM10000's dx_type), and its value for
# an excised lesion.
CONFIRMATION_COLUMN, EXCISED = "meta_dx_type", "histo"


def excised_flags(train_set: ConcatDataset) -> np.ndarray:
    """Each training item (order of `build_datasets`' parts): True for a real benign image whose
    diagnosis was confirmed by histopathology; synthetic images and sources that do not say: False."""
    real, *synthetic = train_set.datasets
    rows = real.dataset.rows
    flags = np.zeros(len(rows), dtype=bool)
    if CONFIRMATION_COLUMN in rows:
        flags = (rows[CONFIRMATION_COLUMN].astype("string").fillna("").str.lower().to_numpy() == EXCISED) & \
            (rows["label"].to_numpy() == 0)
    return np.concatenate([flags] + [np.zeros(len(p), dtype=bool) for p in synthetic])


def excised_indices(flags: np.ndarray, weight: float, generator: torch.Generator, rank: int = 0,
                    world_size: int = 1) -> list[int]:
    """One epoch of indices drawn with replacement, each flagged item `weight` times as likely as any
    other; under DDP every rank takes its share of one draw."""
    w = np.where(np.asarray(flags, dtype=bool), float(weight), 1.0)
    return weighted_draw(w / w.sum(), generator, rank, world_size)


def _lr_at(progress: float, cfg: TrainConfig) -> float:
    """Linear warm-up over the first `warmup_fraction` of training, then cosine decay to zero;
    `progress` is the fraction of the training budget used (0..1)."""
    warm = max(cfg.warmup_fraction, 1e-9)
    if progress < warm:
        return cfg.lr * min(1.0, progress / warm)
    done = min(1.0, (progress - warm) / max(1e-9, 1.0 - warm))
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * done))


def _progress(step: int, total_steps: int, elapsed: float, budget: float) -> float:
    """Fraction of the budget used: steps of `--epochs`, or the clock of `--max-minutes` when that
    runs out first, so a time-limited run still warms up and anneals instead of stopping mid-schedule
    (the clock makes such runs not bitwise repeatable; runs without --max-minutes are)."""
    by_steps = (step + 1) / max(1, total_steps)
    return max(by_steps, elapsed / budget) if math.isfinite(budget) else by_steps


def plot_curves(run_dir: Path) -> None:
    records = [json.loads(x) for x in (run_dir / "stats.jsonl").read_text().splitlines() if x.strip()]
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in records]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(ep, [r["train_loss"] for r in records], label="train loss")
    a.plot(ep, [r["val_loss"] for r in records], label="validation loss")
    b.plot(ep, [r["val_auc"] for r in records], color="C2", label="validation ROC-AUC")
    b.plot(ep, [r["val_pr_auc"] for r in records], color="C3", label="validation PR-AUC")
    for ax in (a, b):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, run_dir / "curves.png")


def train_classifier(data_dir: Path, run_dir: Path, cfg: TrainConfig, resume: bool = False,
                     accelerator: str = "auto", devices: int = 1, progress: bool = True,
                     stop_after_epochs: int | None = None, logger: str | None = None) -> dict:
    """Train on the training split (plus synthetic sets), keep the best-validation-AUC checkpoint.
    `stop_after_epochs` pauses this invocation after that many epochs (resumable with `resume`).
    `logger`: csv or tensorboard beside stats.jsonl (runtime.fabric_loggers)."""
    from lightning_fabric import Fabric

    run_dir = Path(run_dir)
    resumed_notes = []
    if resume:
        if not (run_dir / "last" / "state.json").is_file():
            raise MelanoganError(f"{run_dir}: nothing to resume (no last/ checkpoint). Drop --resume.")
        stored = TrainConfig(**read_json(run_dir / "last" / "state.json")["config"])
        ignored = not_used_on_resume(cfg, stored)
        resumed_notes = [ignored] if ignored else []
        cfg = stored
    elif (run_dir / "stats.jsonl").is_file():
        raise MelanoganError(f"{run_dir}: already holds a classifier run. Pass --resume, or a new --out.")
    fabric_prec = fabric_precision(cfg.precision, accelerator)
    # "auto" is stored as what it chose on this machine: the run's config, its validation scoring and
    # its model card say which precision trained it
    cfg = cfg.model_copy(update={"precision": fabric_prec})
    train_set, _, _ = build_datasets(data_dir, cfg)  # fail early with a clear message
    cfg, notes = resolve_diagnosis_head(cfg, train_set.datasets[0].dataset.rows, data_dir)  # real training rows
    check_coral_sources(train_set, cfg)
    if cfg.excised_weight > 1:
        n_excised = int(excised_flags(train_set).sum())
        notes.append(f"excised_weight {cfg.excised_weight:g}: {n_excised} excised benign training images drawn that "
                     "much more often" if n_excised else
                     f"excised_weight {cfg.excised_weight:g}: no training image says its diagnosis was confirmed by "
                     "histopathology (only HAM10000's metadata does, dx_type 'histo'): a plain shuffle, as without it")
    if cfg.metadata:
        rows = pd.concat([p.dataset.rows for p in train_set.datasets], ignore_index=True)
        warning = missingness_warning(rows, np.concatenate([p.dataset.labels for p in train_set.datasets]),
                                      cfg.metadata)
        if warning:
            notes.append(warning)
    fabric = Fabric(accelerator=accelerator, devices=devices, precision=fabric_prec, strategy=ddp_strategy(devices),
                    loggers=fabric_loggers(logger, run_dir))
    summary = fabric.launch(_train_worker, Path(data_dir), run_dir, cfg, resume, progress, stop_after_epochs)
    return {**summary, "notes": resumed_notes + notes}


def not_used_on_resume(given: TrainConfig, stored: TrainConfig) -> str | None:
    """A resumed run continues with its own stored settings: its optimiser state, schedule, step budget
    and data order belong to them, and its checkpoints and card must describe one run. Options passed
    with --resume that differ from them are therefore not used; this says which, instead of dropping
    them silently. Values a run resolves when it starts (precision auto, the recommended diagnosis
    head) are not a request for another setting and are skipped."""
    differ = []
    for key in TrainConfig.model_fields:
        mine, theirs = getattr(given, key), getattr(stored, key)
        if key == "diagnosis_classes" or (key == "precision" and mine == "auto") or \
                (key == "diagnosis_weight" and mine is None):
            continue
        if mine != theirs:
            differ.append(f"{key} {mine!r} (the run's: {theirs!r})")
    return _not_used_note(differ, "last/state.json")


def resolve_diagnosis_head(cfg: TrainConfig, train_rows: pd.DataFrame, data_dir: Path) -> tuple[TrainConfig, list]:
    """Fill in the diagnosis weight (None = recommended where the data allows) and its classes."""
    if cfg.diagnosis_classes and cfg.diagnosis_weight is not None:
        return cfg, []  # resumed: already resolved
    classes = diagnosis_classes(train_rows, cfg.diagnosis_vocabulary)
    notes = []
    weight = cfg.diagnosis_weight
    if weight is None:
        if len(classes) >= 2:
            weight = RECOMMENDED_DIAGNOSIS_WEIGHT
            notes.append(f"auxiliary diagnosis head on (weight {weight}, {len(classes)} diagnoses in the training "
                         f"split, {cfg.diagnosis_vocabulary} vocabulary); --diagnosis-weight 0 turns it off.")
        else:
            weight = 0.0
            notes.append(f"auxiliary diagnosis head off: the training split has {len(classes)} known diagnosis(es) "
                         "(it needs 2 or more in the manifest's `diagnosis` column).")
    elif weight and len(classes) < 2:
        raise MelanoganError(f"{data_dir}: --diagnosis-weight needs at least 2 known diagnoses in the training "
                             f"split (found {classes or 'none'} in the manifest's `diagnosis` column).")
    return cfg.model_copy(update={"diagnosis_weight": weight, "diagnosis_classes": classes if weight else []}), notes


@dataclass
class LoopState:
    """Where a classifier run stands; saved in last/state.json so that --resume continues exactly."""

    epoch: int = 0
    step: int = 0
    best_auc: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    seconds: float = 0.0


def _train_worker(fabric, data_dir: Path, run_dir: Path, cfg: TrainConfig, resume: bool, progress: bool,
                  stop_after_epochs: int | None) -> dict:
    """Each epoch: train on shuffled (or balanced) batches, score the validation split, keep the best
    checkpoint by validation ROC-AUC; stop at the epoch budget, the time budget or early stopping."""
    torch.manual_seed(cfg.seed)
    train_set, val_set, labels = build_datasets(data_dir, cfg)
    model, optimizer, state = _build_or_resume(fabric, cfg, run_dir, resume)
    if fabric.global_rank == 0:
        _write_run_info(fabric, data_dir, run_dir, cfg, labels, val_set, state)
    run = _EpochRunner(fabric, cfg, run_dir, train_set, val_set, labels, model, optimizer, state)
    last_epoch = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, state.epoch + stop_after_epochs)
    stopped_by = "paused" if last_epoch < cfg.epochs else "epochs"
    # With a time budget the epoch count does not end the run: no ETA then.
    bar = TrainingBar("train", cfg.epochs, state.epoch, eta=not cfg.max_minutes) \
        if progress and fabric.global_rank == 0 else None
    log = RunLog(fabric, run_dir / "stats.jsonl")
    try:
        for epoch in range(state.epoch, last_epoch):
            if cfg.max_steps and state.step >= cfg.max_steps:  # resumed after the step budget ran out
                stopped_by = "step budget"
                break
            out_of_budget = run.train_one_epoch(epoch, bar)
            record = run.validate(epoch)
            improved = run.score(record) > state.best_auc
            state.epoch, state.seconds = epoch + 1, run.elapsed()
            if improved:
                state.best_auc, state.best_epoch, state.bad_epochs = run.score(record), epoch + 1, 0
            else:
                state.bad_epochs += 1
            if fabric.global_rank == 0:
                run.save(improved, record)
                log.write({**record, "best": improved}, epoch + 1)
                plot_curves(run_dir)
                if bar:
                    run.status = f"| val AUC {record['val_auc']:.3f} ({record['img_per_s']:.0f} img/s)"
                    bar.update(run.status, completed=epoch + 1)
            if out_of_budget:
                stopped_by = out_of_budget
                break
            if state.bad_epochs >= cfg.patience:
                stopped_by = "early stopping"
                break
    finally:
        if bar:
            bar.close()
        log.close()
    fabric.barrier()
    shutdown_distributed(fabric)
    return {"run_dir": str(run_dir), "epochs": state.epoch, "steps": state.step, "best_epoch": state.best_epoch,
            "best_val_auc": state.best_auc, "select": cfg.select, "stopped_by": stopped_by,
            "seconds": round(state.seconds, 1)}


def _build_or_resume(fabric, cfg: TrainConfig, run_dir: Path, resume: bool):
    """The model (channels-last on CPU: 1.6-1.8x, measured) and AdamW, from last/ when resuming."""
    model = create_classifier(cfg.model, cfg.image_size, cfg.weights, diagnosis_classes=len(cfg.diagnosis_classes),
                              metadata=cfg.metadata)
    if fabric.device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = LoopState()
    if resume:
        last = run_dir / "last"
        model.load_state_dict(load_file(last / "model.safetensors"))
        optimizer.load_state_dict(torch.load(last / "optimizer.pt", map_location="cpu", weights_only=True))
        state = LoopState(**read_json(last / "state.json")["loop"])
    model, optimizer = fabric.setup(model, optimizer)
    return model, optimizer, state


def _write_run_info(fabric, data_dir: Path, run_dir: Path, cfg: TrainConfig, labels: np.ndarray, val_set,
                    state: LoopState) -> None:
    """config.yaml and run.json (data, synthetic sets, preprocessing); on resume, stats.jsonl is cut back
    to the epochs the checkpoint has seen."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    write_json(run_dir / "run.json", {
        "melanogan_version": __version__, "data_dir": str(Path(data_dir).resolve()),
        "manifest_hash": manifest_hash(load_manifest(data_dir)),
        "synthetic": [{"dir": str(Path(s).resolve()), "manifest_hash": manifest_hash(load_manifest(s)),
                       "images": len(load_manifest(s))} for s in cfg.synthetic],
        "cache_options": read_json(Path(data_dir) / "prepare.json").get("cache_options"),
        "train_images": len(labels), "train_melanoma": int(labels.sum()),
        "val_images": len(val_set), "torch": torch.__version__, "world_size": fabric.world_size,
    })
    stats = run_dir / "stats.jsonl"
    if state.epoch and stats.is_file():
        lines = stats.read_text().splitlines()
        write_text(stats, "".join(x + "\n" for x in lines if x.strip() and json.loads(x)["epoch"] <= state.epoch))


class _EpochRunner:
    """The pieces of one epoch: its loader, the optimisation steps, validation and checkpoints."""

    def __init__(self, fabric, cfg: TrainConfig, run_dir: Path, train_set, val_set, labels, model, optimizer,
                 state: LoopState) -> None:
        self.fabric, self.cfg, self.run_dir, self.state = fabric, cfg, run_dir, state
        self.train_set, self.val_set, self.labels = train_set, val_set, labels
        self.model, self.optimizer, self.raw = model, optimizer, model.module
        self.compute_loss = loss_fn(cfg, labels)
        self.batch_aug = BatchAugment(cfg.image_size, cfg.augment, color=cfg.color_augment,
                                      illumination=cfg.illumination_augment,
                                      aspect=cfg.crop_aspect, grayscale=cfg.grayscale).to(fabric.device) \
            if uses_batch_augment(cfg) else None
        image_styles = {"randconv": RandomConvolution, "amplitude": AmplitudeMix}  # mixstyle acts on features
        self.style_aug = image_styles[cfg.style_augment]() if cfg.style_augment in image_styles else None
        # the average is a copy made before MixStyle hooks the model, so it never mixes styles
        self.ema = average_of(self.raw, cfg, run_dir if state.epoch else None)
        # hooks on the unwrapped model's early stages; they act in training mode only
        self.mixstyle = MixStyle(cfg.model, self.raw) if cfg.style_augment == "mixstyle" else None
        self.val_metadata = encode_metadata(val_set.rows, cfg.metadata) if cfg.metadata else None
        self.val_sources = val_sources(val_set, cfg)
        self.sources = training_sources(train_set) if cfg.sampler == "source" else None
        # computed again here (train_classifier's note computed it too) because, like build_datasets,
        # this side of fabric.launch may be a spawned DDP process that rebuilds its own datasets
        excised = excised_flags(train_set) if cfg.excised_weight > 1 else None
        self.excised = excised if excised is not None and excised.any() else None  # none: train_classifier said so
        self.total_steps = max(1, len(train_set) // (cfg.batch_size * fabric.world_size)) * cfg.epochs
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
        self.t_start = time.perf_counter() - state.seconds
        self.status = ""  # the last epoch's validation AUC, kept on the bar while the next epoch runs
        self.seen, self.train_seconds, self.losses, self.penalties = 0, 0.0, [], []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def loader(self, epoch: int):
        """This epoch's batches: shuffled, or drawn balanced (each rank its share under DDP)."""
        cfg, fabric = self.cfg, self.fabric
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # augmentation randomness of this epoch
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        rank, world = fabric.global_rank, fabric.world_size
        if cfg.sampler == "balanced":
            sampler = balanced_indices(self.labels, gen, rank, world)
        elif cfg.sampler == "source":
            sampler = source_balanced_indices(self.sources, gen, rank, world)
        elif self.excised is not None:
            sampler = excised_indices(self.excised, cfg.excised_weight, gen, rank, world)
        else:
            sampler = None
        if sampler is not None:
            loader = DataLoader(self.train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                num_workers=loader_workers(cfg), generator=gen)
        else:
            loader = DataLoader(self.train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                num_workers=loader_workers(cfg), generator=gen)
        return fabric.setup_dataloaders(loader, use_distributed_sampler=sampler is None)

    def train_one_epoch(self, epoch: int, bar) -> str | None:
        """One pass over the loader; which budget ran out during it ("time budget", "step budget"), if one did."""
        cfg, fabric, state = self.cfg, self.fabric, self.state
        aug_gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 101 + fabric.global_rank + 1)
        # mixup's own stream: the augmentation draws stay those of the same run without mixup
        mix_rng = np.random.default_rng([cfg.seed, epoch, fabric.global_rank]) if cfg.mixup else None
        channels_last = fabric.device.type == "cpu"
        self.model.train()
        self.losses, self.penalties, self.seen, t0 = [], [], 0, time.perf_counter()
        loader = self.loader(epoch)
        out_of_budget = None
        for x, y, diagnosis, meta, source in loader:
            meta = meta if cfg.metadata else None
            if self.batch_aug is not None:
                x = self.batch_aug(x, aug_gen)
            if self.style_aug is not None:
                x = self.style_aug(x, aug_gen)
            if self.mixstyle is not None:
                self.mixstyle.next_batch(len(x), aug_gen)
            mix = mixup.draw(len(x), cfg.mixup, mix_rng) if mix_rng is not None else None
            if mix is not None:
                x = mixup.mix_images(x, mix)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for group in self.optimizer.param_groups:
                group["lr"] = _lr_at(_progress(state.step, self.total_steps, self.elapsed(), self.budget), cfg)
            logits, diagnosis_logits, features = self.model(x, meta, with_diagnosis=bool(cfg.diagnosis_weight),
                                                            with_features=True)
            objective = partial(self.objective, logits, diagnosis_logits)
            loss = objective(y, diagnosis) if mix is None else mixup.mixed_loss(objective, mix, y, diagnosis)
            if cfg.coral:
                penalty = coral.coral_penalty(features, source)
                loss = loss + cfg.coral * penalty
                self.penalties.append(float(penalty.detach()))
            if not torch.isfinite(loss):
                raise MelanoganError(f"classifier loss became {float(loss)} at epoch {epoch + 1}; the best checkpoint "
                                     f"in {self.run_dir / 'best'} is kept. Lower --lr or use --precision 32.")
            self.optimizer.zero_grad(set_to_none=True)
            fabric.backward(loss)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update_parameters(self.raw)
            self.losses.append(float(loss.detach()))
            self.seen += len(x) * fabric.world_size
            state.step += 1
            if bar:
                bar.update(f"epoch {epoch + 1} batch {len(self.losses)}/{len(loader)} "
                           f"loss {float(np.mean(self.losses[-20:])):.3f} {self.status}")
            if self.elapsed() > self.budget:
                out_of_budget = "time budget"
                break
            if cfg.max_steps and state.step >= cfg.max_steps:
                out_of_budget = "step budget"
                break
        self.train_seconds = time.perf_counter() - t0
        return out_of_budget

    def objective(self, logits: torch.Tensor, diagnosis_logits: torch.Tensor | None, y: torch.Tensor,
                  diagnosis: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch's outputs against its targets: melanoma, plus the weighted
        diagnosis loss when the diagnosis head is on."""
        loss = self.compute_loss(logits, y)
        if diagnosis_logits is not None:
            loss = loss + self.cfg.diagnosis_weight * diagnosis_loss(diagnosis_logits, diagnosis)
        return loss

    def validate(self, epoch: int) -> dict:
        """The epoch's record: training loss, validation loss, ROC-AUC and PR-AUC, lr and throughput."""
        val_logits = predict_logits(self.scored(), self.val_set, device=self.fabric.device,
                                    autocast="bf16" in self.cfg.precision, metadata=self.val_metadata)
        val_y = self.val_set.labels
        val_loss = float(F.binary_cross_entropy_with_logits(torch.as_tensor(val_logits),
                                                            torch.as_tensor(val_y, dtype=torch.float32)))
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(self.losses)) if self.losses else float("nan"),
                  "val_loss": val_loss, "val_auc": roc_auc(val_y, val_logits), "val_pr_auc": pr_auc(val_y, val_logits),
                  "lr": self.optimizer.param_groups[0]["lr"],
                  "img_per_s": round(self.seen / max(self.train_seconds, 1e-9), 1), "seconds": round(self.elapsed(), 1)}
        # recorded whatever selects the epoch: how each source fares (one source: the pooled AUC);
        # NaN when no source holds both classes (select 'worst_source_auc' refuses that at the start)
        record["val_auc_by_source"] = roc_auc_by_group(val_y, val_logits, self.val_sources)
        record["val_auc_worst_source"] = min(record["val_auc_by_source"].values(), default=float("nan"))
        if self.cfg.coral:  # the unweighted CORAL penalty, mean over the epoch's batches (in train_loss, weighted)
            record["train_coral"] = float(np.mean(self.penalties)) if self.penalties else float("nan")
        return record

    def scored(self) -> nn.Module:
        """The model that is validated and kept: the weight average when there is one."""
        return self.raw if self.ema is None else self.ema.module

    def score(self, record: dict) -> float:
        """The figure the best epoch is chosen by (cfg.select)."""
        return record["val_auc"] if self.cfg.select == "auc" else record["val_auc_worst_source"]

    def save(self, improved: bool, record: dict) -> None:
        """best/ when validation improved; last/ (with the optimizer and loop state) every epoch."""
        if improved:
            save_model(self.run_dir / "best", self.scored(), self.cfg,
                       {"epoch": self.state.epoch, "val_auc": record["val_auc"], "select": self.cfg.select,
                        "selected_by": self.score(record)})
        save_model(self.run_dir / "last", self.raw, self.cfg, {"loop": asdict(self.state)})
        if self.ema is not None:  # the average goes on from here on --resume
            with atomic_path(self.run_dir / "last" / "ema.safetensors", suffix=".safetensors") as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()}, tmp)
        with atomic_path(self.run_dir / "last" / "optimizer.pt", suffix=".pt") as tmp:
            torch.save(self.optimizer.state_dict(), tmp)
