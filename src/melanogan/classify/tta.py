"""Test-time augmentation: the melanoma logit averaged over flips and 90-degree rotations.

Why these views: a dermoscopic image has no canonical orientation (the dermoscope is placed at any
angle), so the eight symmetries of the square (the dihedral group D4) are all equally valid photos
of the lesion, and they need no interpolation (exact pixel permutations). Averaging is done on
logits, not probabilities, so that one confident view does not saturate the mean. ISIC-winning
pipelines used such flips; the gain is measured by `evaluate --tta`, not assumed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# The views in the order they are added: N=2 adds the horizontal flip, N=4 the other flips, N=8 the
# rotations by 90 degrees and the two diagonal reflections.
VIEWS: tuple[tuple[str, Callable[[torch.Tensor], torch.Tensor]], ...] = (
    ("identity", lambda x: x),
    ("hflip", lambda x: x.flip(-1)),
    ("vflip", lambda x: x.flip(-2)),
    ("rot180", lambda x: x.flip(-1, -2)),
    ("rot90", lambda x: x.rot90(1, (-2, -1))),
    ("rot270", lambda x: x.rot90(-1, (-2, -1))),
    ("transpose", lambda x: x.transpose(-2, -1)),
    ("transverse", lambda x: x.flip(-1, -2).transpose(-2, -1)),
)
TTA_CHOICES = (1, 2, 4, 8)


def check_tta(n: int) -> int:
    from melanogan.errors import MelanoganError

    if n not in TTA_CHOICES:
        raise MelanoganError(f"--tta {n}: use 1 (off), 2 (+ horizontal flip), 4 (all flips) or 8 (flips and "
                             "90-degree rotations).")
    return n


def tta_logits(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n: int = 1) -> torch.Tensor:
    """Mean of `model` over the first `n` views of the batch `x` (B, C, H, W); n=1 is `model(x)`."""
    check_tta(n)
    if n == 1:
        return model(x)
    return torch.stack([model(view(x)).float() for _, view in VIEWS[:n]]).mean(0)
