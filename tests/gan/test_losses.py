"""Losses as pure functions, against closed forms."""

from __future__ import annotations

import pytest
import torch

from melanogan.gan.losses import critic_loss, diff_augment, generator_loss, gradient_penalty, wasserstein_estimate


def _linear_critic(w: torch.Tensor):
    """f(x) = w.x (+ label-dependent constant): its input gradient is w for every x."""
    return lambda x, labels: (x.flatten(1) * w.to(x.dtype)).sum(1) + labels.to(x.dtype)


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5])
def test_gradient_penalty_closed_form_for_a_linear_critic(scale):
    torch.manual_seed(0)
    w = torch.randn(3 * 8 * 8)
    w = w / w.norm() * scale
    real, fake = torch.randn(5, 3, 8, 8), torch.randn(5, 3, 8, 8)
    gp = gradient_penalty(_linear_critic(w), real, fake, torch.zeros(5, dtype=torch.long))
    assert gp.dtype == torch.float32
    assert torch.allclose(gp, torch.tensor((scale - 1.0) ** 2), atol=1e-6)


def test_gradient_penalty_stays_exact_under_bf16_autocast():
    torch.manual_seed(1)
    w = torch.randn(3 * 8 * 8)
    w = w / w.norm() * 1.7
    real, fake = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gp = gradient_penalty(_linear_critic(w), real.bfloat16(), fake.bfloat16(), torch.zeros(4, dtype=torch.long))
    assert gp.dtype == torch.float32
    assert abs(float(gp) - 0.49) < 1e-5  # bf16 arithmetic would be off by ~1e-2


def test_gradient_penalty_is_per_sample():
    """Half the samples with gradient norm 2 and half with 0 give mean((2-1)^2, (0-1)^2) = 1."""
    def critic(x, labels):
        return (x.flatten(1)[:, 0] * 2.0) * (labels == 1)

    real = torch.randn(4, 3, 4, 4)
    gp = gradient_penalty(critic, real, real.clone(), torch.tensor([1, 1, 0, 0]))
    assert torch.allclose(gp, torch.tensor(1.0))


def test_wgan_losses():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])
    assert float(critic_loss(real, fake)) == pytest.approx(-0.5 - 2.0)
    assert float(wasserstein_estimate(real, fake)) == pytest.approx(2.5)
    assert float(generator_loss(fake)) == pytest.approx(0.5)


def test_diff_augment_shapes_determinism_and_gradients():
    x = (torch.rand(6, 3, 16, 16) * 2 - 1).requires_grad_(True)
    a = diff_augment(x, ["color", "translation", "cutout"], torch.Generator().manual_seed(3))
    b = diff_augment(x, ["color", "translation", "cutout"], torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable: the generator learns through it
    cut = diff_augment(torch.ones(4, 3, 16, 16), ["cutout"], torch.Generator().manual_seed(0))
    removed = float((cut == 0).float().mean())
    assert 0.1 < removed <= 0.25  # a half-size square, clipped at the borders
    assert torch.equal(diff_augment(x, []), x)
    with pytest.raises(ValueError, match="unknown DiffAugment"):
        diff_augment(x, ["rotate"])
