"""Adapting batch normalisation to a site (AdaBN): exact pooled statistics on constructed inputs,
nothing else of the model touched, and the property it exists for (a site whose inputs differ by a
gain scores, once adapted, as the original inputs do)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from melanogan.classify.adapt import adapt_batchnorm, batchnorm_statistics, even_batch_size, load_statistics
from melanogan.classify.models import create_classifier
from melanogan.errors import MelanoganError


def _two_channel_bn() -> nn.Sequential:
    conv = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))  # channel 1 is twice channel 0
    return nn.Sequential(conv, nn.BatchNorm2d(2))


def test_statistics_are_pooled_over_every_image_exactly_whatever_the_batch_sizes():
    first = torch.arange(3 * 4, dtype=torch.float32).view(3, 1, 2, 2)  # 0..11, batch of 3
    second = torch.full((1, 1, 2, 2), 100.0)  # one very different image in a batch of its own
    model = _two_channel_bn().eval()
    before = copy.deepcopy(model.state_dict())
    assert adapt_batchnorm(model, [(first, None), (second, None)]) == (4, ["1"])
    pixels = torch.cat([first.flatten(), second.flatten()]).double()  # 16 values per channel
    bn = model[1]
    # a per-batch average (BatchNorm's momentum=None) would give (5.5 + 100) / 2 = 52.75
    assert bn.running_mean.tolist() == pytest.approx([pixels.mean().item(), 2 * pixels.mean().item()], rel=1e-6)
    assert bn.running_mean[0].item() == pytest.approx((66 + 400) / 16)
    var = pixels.var(unbiased=True).item()
    assert bn.running_var.tolist() == pytest.approx([var, 4 * var], rel=1e-6)
    after = model.state_dict()  # nothing else changed: weights, affine parameters, batch counter
    for key in before:
        if not key.endswith(("running_mean", "running_var")):
            assert torch.equal(before[key], after[key]), key
    assert bn.momentum == 0.1 and not model.training


def test_a_training_model_stays_in_training_mode():
    model = _two_channel_bn().train()
    adapt_batchnorm(model, [(torch.randn(4, 1, 3, 3), None)])
    assert model.training and model[1].training


def test_a_site_that_differs_by_a_gain_scores_as_the_original_once_adapted():
    torch.manual_seed(0)
    x = torch.rand(24, 3, 32, 32)
    original = create_classifier("small-cnn", 32).eval()
    for m in original.modules():  # trained-looking statistics, not the initial 0 / 1
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        unadapted = original(3 * x)
    on_own, on_site = copy.deepcopy(original), copy.deepcopy(original)
    adapt_batchnorm(on_own, [(x[:12], None), (x[12:], None)])
    adapt_batchnorm(on_site, [(3 * x[:12], None), (3 * x[12:], None)])
    with torch.no_grad():
        own, site = on_own(x), on_site(3 * x)
    # the first conv has no bias and zero padding, so a gain passes through it and the adapted first
    # BatchNorm divides it out (up to its eps): every later layer sees the same features
    assert torch.allclose(site, own, atol=1e-3)
    assert (unadapted - own).abs().max() > 0.1  # without adapting, the gain changes the scores


def test_instance_batch_norm_adapts_its_batch_half():
    model = create_classifier("small-cnn-ibn", 32)
    names = [k for k in batchnorm_statistics(model) if ".bn." in k]
    assert names  # the BatchNorm half of each IBN layer is among the adapted layers
    adapt_batchnorm(model, [(torch.rand(8, 3, 32, 32) * 4, None)])
    assert all(not torch.equal(batchnorm_statistics(model)[k], torch.zeros_like(batchnorm_statistics(model)[k]))
               for k in names if k.endswith("running_mean"))


class _DeclaredBackwards(nn.Module):
    """Declares its BatchNorm layers in another order than the forward pass reaches them, and one
    (an unused head's) that the forward pass never reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.BatchNorm2d(2)
        self.late = nn.BatchNorm2d(2)
        self.early = nn.BatchNorm2d(2)
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 5.0]]).view(2, 2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.late(self.conv(self.early(x)))


def test_adapting_the_first_layers_follows_the_forward_order_and_leaves_the_rest_as_trained():
    torch.manual_seed(1)
    x = torch.randn(6, 2, 3, 3) * torch.tensor([2.0, 0.5]).view(1, 2, 1, 1) + torch.tensor([4.0, -1.0]).view(1, 2, 1, 1)
    shallow, full = _DeclaredBackwards().eval(), _DeclaredBackwards().eval()
    for m in (shallow, full):  # trained-looking statistics
        for bn, v in ((m.unused, 7.0), (m.late, 9.0), (m.early, 11.0)):
            bn.running_mean.fill_(v)
            bn.running_var.fill_(v)
    trained = copy.deepcopy(shallow.state_dict())
    assert adapt_batchnorm(shallow, [(x, None)], layers=1) == (6, ["early"])
    # the first layer reached is `early` though `late` is declared first: its statistics are the images'
    pixels = x.transpose(0, 1).reshape(2, -1).double()
    assert shallow.early.running_mean.tolist() == pytest.approx(pixels.mean(1).tolist(), rel=1e-6)
    assert shallow.early.running_var.tolist() == pytest.approx(pixels.var(1, unbiased=True).tolist(), rel=1e-6)
    for name in ("late", "unused"):  # not adapted: exactly as trained
        for buf in ("running_mean", "running_var"):
            assert torch.equal(shallow.state_dict()[f"{name}.{buf}"], trained[f"{name}.{buf}"])
    # a shallow layer's statistics are those a full adaptation gives it; the full one also moves `late`
    # (whose input, normalised by the batch, has mean 0 per channel) and never the unreached layer
    assert adapt_batchnorm(full, [(x[:4], None), (x[4:], None)]) == (6, ["early", "late"])
    assert torch.allclose(full.early.running_mean, shallow.early.running_mean)
    assert torch.allclose(full.early.running_var, shallow.early.running_var)
    assert full.late.running_mean.abs().max() < 1e-5
    assert torch.equal(full.unused.running_var, trained["unused.running_var"])


def test_a_number_of_layers_the_model_does_not_have_is_refused():
    model = _DeclaredBackwards()
    for layers, message in ((0, "has 3; use 1 to 3"), (4, "has 3; use 1 to 3"), (3, "reaches only 2")):
        with pytest.raises(MelanoganError, match=message):
            adapt_batchnorm(model, [(torch.randn(4, 2, 3, 3), None)], layers=layers)
    assert torch.equal(model.early.running_mean, torch.zeros(2))  # a refused adaptation changes nothing


def test_even_batch_sizes():
    assert [even_batch_size(n) for n in (1, 33, 64, 65, 128, 129)] == [1, 33, 64, 33, 64, 43]


def test_statistics_of_another_model_are_refused_and_a_model_without_batchnorm_cannot_adapt():
    small, ibn = create_classifier("small-cnn", 32), create_classifier("small-cnn-ibn", 32)
    with pytest.raises(MelanoganError, match="another model"):
        load_statistics(ibn, batchnorm_statistics(small), "site.safetensors")
    stats = {k: v + 1 for k, v in batchnorm_statistics(small).items()}
    load_statistics(small, stats, "site.safetensors")
    assert all(torch.equal(batchnorm_statistics(small)[k], stats[k]) for k in stats)
    with pytest.raises(MelanoganError, match="no batch normalisation"):
        adapt_batchnorm(nn.Sequential(nn.Conv2d(3, 2, 1)), [(torch.rand(2, 3, 4, 4), None)])
