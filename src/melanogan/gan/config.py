"""GAN training configuration: validated (pydantic), loaded from presets shipped as YAML."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from melanogan.errors import MelanoganError

PRESETS = ("original", "default")


class GanConfig(BaseModel):
    """Everything a GAN run depends on; stored in RUN_DIR/config.yaml and in every checkpoint."""

    model_config = ConfigDict(extra="forbid")

    preset: str = "default"
    arch: str = "dcgan"
    resolution: int = 64
    noise_dim: int = 128
    generator_channels: int = 256
    critic_channels: int = 64
    kernel_size: int = 4
    critic_norm: Literal["none", "layer"] = "none"
    generator_norm: Literal["batch", "none"] = "batch"
    classes: list[int] = Field(default_factory=lambda: [0, 1])  # classes the generator learns
    balance_classes: bool = True  # draw training batches half melanoma, half other
    n_critic: int = 5
    gp_lambda: float = 10.0
    lr: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.9)
    lr_milestones: list[float] = Field(default_factory=list)  # fractions of training
    lr_factors: list[float] = Field(default_factory=list)  # multiplier of lr after each milestone
    steps: int = 20000  # generator steps
    batch_size: int = 32
    diffaugment: list[str] = Field(default_factory=lambda: ["translation"])
    ema_decay: float | None = 0.999
    seed: int = 0
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    max_wasserstein: float = 1e4  # |W estimate| above this = divergence
    kid_every: int = 0  # steps between KID evaluations (0 = off); the best-KID checkpoint is kept
    kid_features: str = "pixels"  # pixels or classifier:RUN_DIR (domain features)
    kid_samples: int = 500
    # Splits whose images the GAN trains on. Only ["train"] is honest; the study's `protocol: original`
    # sets all three to reproduce the original study's leak (its GAN saw every melanoma).
    train_splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["train"])

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[int]) -> list[int]:
        if not v or any(c not in (0, 1) for c in v):
            raise ValueError("classes must be a non-empty subset of [0, 1]")
        return sorted(set(v))

    def model_post_init(self, _context) -> None:
        if len(self.lr_milestones) != len(self.lr_factors):
            raise ValueError("lr_milestones and lr_factors need the same length")

    def lr_at(self, step: int) -> float:
        """Piecewise-constant schedule: lr times the factor of the last milestone passed."""
        factor = 1.0
        for milestone, f in zip(self.lr_milestones, self.lr_factors, strict=True):
            if step >= milestone * self.steps:
                factor = f
        return self.lr * factor


def requested_fields(preset: str = "default", config_file: Path | None = None, **overrides) -> set[str]:
    """The GanConfig fields a load_config call sets on purpose: its overrides that are not None, the
    fields of its config file and, unless it is the default, the preset's name (an omitted --preset
    cannot be told from --preset default). A resumed run compares these with its own config
    (gan.train.not_used_on_resume); the preset's other values are not a request."""
    fields = {k for k, v in overrides.items() if v is not None}
    if config_file is not None:
        try:
            fields |= set(yaml.safe_load(Path(config_file).read_text()) or {})
        except (OSError, yaml.YAMLError) as exc:
            raise MelanoganError(f"{config_file}: cannot read the GAN config ({exc}).") from exc
    if preset != "default":
        fields.add("preset")
    return fields


def load_config(preset: str = "default", config_file: Path | None = None, **overrides) -> GanConfig:
    """A preset (shipped YAML), then a user YAML file, then explicit overrides (None = keep)."""
    if preset not in PRESETS:
        raise MelanoganError(f"unknown GAN preset {preset!r}; use one of {', '.join(PRESETS)} "
                             "(or --config FILE.yaml).")
    data = yaml.safe_load(resources.files("melanogan.configs").joinpath(f"gan-{preset}.yaml").read_text())
    if config_file is not None:
        try:
            data.update(yaml.safe_load(Path(config_file).read_text()) or {})
        except (OSError, yaml.YAMLError) as exc:
            raise MelanoganError(f"{config_file}: cannot read the GAN config ({exc}).") from exc
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return GanConfig(**data)
    except ValidationError as exc:
        raise MelanoganError(f"invalid GAN config: {exc}") from exc
