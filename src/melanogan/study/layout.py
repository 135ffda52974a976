"""Where a study's stages write inside STUDY_DIR (shared by the runner and the report, so the report
reads runs without importing the runner)."""

from __future__ import annotations

from pathlib import Path

ORIGINAL_DIR = "original-protocol"  # the original (leaky) protocol beside an honest study


def arm_dir(study_dir: Path, seed: int, arm: str) -> Path:
    """Classifier runs live apart from the GAN run (an arm may be called "gan")."""
    return Path(study_dir) / f"seed-{seed}" / "arms" / arm
