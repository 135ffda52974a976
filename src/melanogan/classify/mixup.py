"""Mixup (Zhang et al., "mixup: Beyond empirical risk minimization", ICLR 2018): a lever of README's
"Models that travel".

Each training batch is replaced by convex mixes of its images with a random partner from the same
batch, lam * x_i + (1 - lam) * x_partner(i), and the loss by the same mix of the two images' losses
(melanoma and, with the diagnosis head, diagnosis). Why it might travel: the model is asked to be
linear between training images, so it cannot put a sharp boundary along a cue that only some images
carry (a dermoscope's colour cast, a ruler, a vignette); with two training sources and a random
partner many pairs cross sources, the "inter-domain mixup" of domain generalisation (DomainBed's
Mixup, Yan et al. 2020). One lam per batch, lam ~ Beta(alpha, alpha), as in the paper; alpha 0.2
(most lams near 0 or 1: mostly one image, sometimes an even mix).

Pure functions; the draws come from a NumPy generator of their own, so that a mixup run's geometry
and colour draws are those of the same run without it (a paired comparison changes one thing).
Nothing is learnt or stored: inference and checkpoints are untouched. A mixup run's training loss
(stats.jsonl, the progress bar) is the mixed loss, higher than an unmixed run's by construction;
its validation loss and AUC are on unmixed images, comparable with any run's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class MixDraw:
    """One batch's mix: image i becomes lam * x[i] + (1 - lam) * x[partner[i]]."""

    lam: float
    partner: torch.Tensor  # (B,) long, a permutation of the batch


def draw(n: int, alpha: float, rng: np.random.Generator) -> MixDraw:
    """lam ~ Beta(alpha, alpha) and a uniformly random permutation of n (an image may be its own
    partner, as in the paper's shuffled batch; it then stays itself whatever lam)."""
    if not alpha > 0:
        raise ValueError(f"mixup alpha must be positive (0 turns mixup off), got {alpha}")
    lam = float(rng.beta(alpha, alpha))
    return MixDraw(lam, torch.from_numpy(rng.permutation(n)).long())


def mix_images(x: torch.Tensor, d: MixDraw) -> torch.Tensor:
    """The mixed batch, in x's dtype (float images, after augmentation and normalisation: a mix of
    two normalised images is the normalised mix of the two, the normalisation being affine)."""
    partner = d.partner.to(x.device)
    return (d.lam * x.float() + (1.0 - d.lam) * x[partner].float()).to(x.dtype)


def mixed_loss(objective: Callable[..., torch.Tensor], d: MixDraw, *targets: torch.Tensor) -> torch.Tensor:
    """lam * objective(targets) + (1 - lam) * objective(the partners' targets). For binary
    cross-entropy this equals the loss against the mixed soft label (it is linear in the target); the
    diagnosis head's cross-entropy over known diagnoses and the focal loss are not, so the two losses
    are mixed rather than the labels."""
    partner = d.partner.to(targets[0].device)
    return d.lam * objective(*targets) + (1.0 - d.lam) * objective(*(t[partner] for t in targets))
