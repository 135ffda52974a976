import numpy as np
import pytest
import torch
import torch.nn.functional as F

from melanogan.classify.mixup import MixDraw, draw, mix_images, mixed_loss


def test_images_mix_with_their_partners_exactly():
    x = torch.tensor([0.0, 10.0, 20.0]).view(3, 1, 1, 1).expand(3, 3, 2, 2).contiguous()
    d = MixDraw(0.75, torch.tensor([2, 0, 1]))
    out = mix_images(x, d)
    # image i: 0.75 x[i] + 0.25 x[partner[i]]
    assert torch.equal(out[:, 0, 0, 0], torch.tensor([5.0, 7.5, 17.5]))
    assert torch.equal(out[1], torch.full((3, 2, 2), 7.5))  # every channel and pixel alike
    assert torch.equal(mix_images(x, MixDraw(1.0, torch.tensor([2, 0, 1]))), x)  # lam 1: unchanged
    assert torch.equal(mix_images(x, MixDraw(0.0, torch.tensor([2, 0, 1]))), x[[2, 0, 1]])  # lam 0: the partners
    half = mix_images(x.bfloat16(), d)
    assert half.dtype == torch.bfloat16 and torch.equal(half.float()[:, 0, 0, 0], torch.tensor([5.0, 7.5, 17.5]))


def test_losses_are_mixed_with_the_partners_targets():
    logits = torch.tensor([2.0, -1.0, 0.5, 0.0])
    y = torch.tensor([1, 0, 0, 1])
    codes = torch.tensor([3, -1, 0, 2])
    calls = []

    def objective(y, codes):
        calls.append((y.tolist(), codes.tolist()))
        return F.binary_cross_entropy_with_logits(logits, y.float()) + codes.float().sum()

    d = MixDraw(0.3, torch.tensor([1, 2, 3, 0]))
    loss = mixed_loss(objective, d, y, codes)
    assert calls == [([1, 0, 0, 1], [3, -1, 0, 2]), ([0, 0, 1, 1], [-1, 0, 2, 3])]  # own, then the partners'
    expected = 0.3 * objective(y, codes) + 0.7 * objective(y[[1, 2, 3, 0]], codes[[1, 2, 3, 0]])
    assert torch.allclose(loss, expected, atol=0, rtol=1e-6)
    # for binary cross-entropy, mixing the losses is the loss against the mixed soft label
    soft = 0.3 * y.float() + 0.7 * y[[1, 2, 3, 0]].float()
    bce = mixed_loss(lambda t: F.binary_cross_entropy_with_logits(logits, t.float()), d, y)
    assert torch.allclose(bce, F.binary_cross_entropy_with_logits(logits, soft), rtol=1e-6)


def test_draws_follow_beta_and_repeat_with_the_generator():
    lams = np.array([draw(8, 0.2, np.random.default_rng([5, i])).lam for i in range(4000)])
    # Beta(0.2, 0.2): symmetric about 0.5, mass near the ends (P(lam < 0.1) = 0.3367 by its CDF)
    assert abs(lams.mean() - 0.5) < 0.02
    assert abs((lams < 0.1).mean() - 0.3367) < 0.025 and abs((lams > 0.9).mean() - 0.3367) < 0.025
    even = np.array([draw(8, 8.0, np.random.default_rng([6, i])).lam for i in range(2000)])
    assert even.std() < 0.13 and abs(even.mean() - 0.5) < 0.01  # a large alpha mixes evenly
    d = draw(16, 0.2, np.random.default_rng(3))
    assert sorted(d.partner.tolist()) == list(range(16)) and d.partner.dtype == torch.long
    again = draw(16, 0.2, np.random.default_rng(3))
    assert again.lam == d.lam and torch.equal(again.partner, d.partner)
    with pytest.raises(ValueError, match="must be positive"):
        draw(4, 0.0, np.random.default_rng(0))
