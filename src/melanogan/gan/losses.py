"""WGAN-GP losses and DiffAugment as pure functions of tensors (no module state)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def critic_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """Critic minimises E[D(fake)] - E[D(real)] (the negative Wasserstein estimate)."""
    return fake_scores.float().mean() - real_scores.float().mean()


def generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    return -fake_scores.float().mean()


def wasserstein_estimate(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    return real_scores.float().mean() - fake_scores.float().mean()


def gradient_penalty(critic: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], real: torch.Tensor,
                     fake: torch.Tensor, labels: torch.Tensor, alpha: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """E[(||grad_x D(x_hat)||_2 - 1)^2] at x_hat = alpha*real + (1-alpha)*fake (Gulrajani et al. 2017).

    Computed in float32 with autocast off: under bf16 the squared-norm of a gradient loses the
    precision the penalty is about, so mixed precision would silently weaken the constraint."""
    device_type = real.device.type
    if alpha is None:
        alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, generator=generator)
    with torch.autocast(device_type=device_type, enabled=False):
        x_hat = (alpha * real.float() + (1 - alpha) * fake.detach().float()).requires_grad_(True)
        scores = critic(x_hat, labels).float()
        (grads,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
        norms = grads.flatten(1).norm(2, dim=1)
        return ((norms - 1) ** 2).mean()


def diff_augment(x: torch.Tensor, policy: Sequence[str], generator: torch.Generator | None = None) -> torch.Tensor:
    """Differentiable augmentation (Zhao et al. 2020), applied identically in kind to real and fake
    images before the critic so that a small dataset does not let the critic memorise it.
    `policy` items: `color`, `translation`, `cutout`. Images are in [-1, 1]."""
    for p in policy:
        if p not in _AUGMENTS:
            raise ValueError(f"unknown DiffAugment policy {p!r}; use {', '.join(_AUGMENTS)}")
        x = _AUGMENTS[p](x, generator)
    return x


def _rand(x: torch.Tensor, g: torch.Generator | None, *shape: int) -> torch.Tensor:
    return torch.rand(x.shape[0], *shape, device=x.device, generator=g, dtype=torch.float32).to(x.dtype)


def _color(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    x = x + (_rand(x, g, 1, 1, 1) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand(x, g, 1, 1, 1) * 2) + mean
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_rand(x, g, 1, 1, 1) + 0.5) + mean


def _translation(x: torch.Tensor, g: torch.Generator | None, ratio: float = 0.125) -> torch.Tensor:
    b, _, h, w = x.shape
    sx, sy = int(h * ratio + 0.5), int(w * ratio + 0.5)
    tx = torch.randint(-sx, sx + 1, (b, 1, 1), device=x.device, generator=g)
    ty = torch.randint(-sy, sy + 1, (b, 1, 1), device=x.device, generator=g)
    gb, gx, gy = torch.meshgrid(torch.arange(b, device=x.device), torch.arange(h, device=x.device),
                                torch.arange(w, device=x.device), indexing="ij")
    gx = torch.clamp(gx + tx + 1, 0, h + 1)
    gy = torch.clamp(gy + ty + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    return padded.permute(0, 2, 3, 1)[gb, gx, gy].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, g: torch.Generator | None, ratio: float = 0.5) -> torch.Tensor:
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ox = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device, generator=g)
    oy = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device, generator=g)
    gb, gx, gy = torch.meshgrid(torch.arange(b, device=x.device), torch.arange(ch, device=x.device),
                                torch.arange(cw, device=x.device), indexing="ij")
    gx = torch.clamp(gx + ox - ch // 2, 0, h - 1)
    gy = torch.clamp(gy + oy - cw // 2, 0, w - 1)
    mask = torch.ones(b, h, w, dtype=x.dtype, device=x.device)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


_AUGMENTS = {"color": _color, "translation": _translation, "cutout": _cutout}
