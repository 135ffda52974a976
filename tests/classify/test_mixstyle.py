"""MixStyle: exact statistics on constructed feature maps, the hooks act in training only, and every
registered CNN has its mixing layers."""

from __future__ import annotations

import pytest
import torch

from melanogan.classify.mixstyle import MixStyle, mixstyle, style_layers
from melanogan.classify.models import create_classifier
from melanogan.errors import MelanoganError


def _two_images() -> torch.Tensor:
    # image 0: values 0 and 2 (mean 1, std 1); image 1: 10 and 14 (mean 12, std 2), same pattern
    pattern = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    return torch.stack([(pattern * 2).expand(2, 2, 2), (10 + pattern * 4).expand(2, 2, 2)])


def test_mixstyle_swaps_and_mixes_statistics_exactly():
    x = _two_images()
    swap = torch.tensor([1, 0])
    same = mixstyle(x, swap, torch.ones(2))  # lambda 1: each keeps its own style
    assert torch.allclose(same, x, atol=1e-5)
    swapped = mixstyle(x, swap, torch.zeros(2))  # lambda 0: the pattern in the other's style
    assert torch.allclose(swapped[0], x[1], atol=1e-4) and torch.allclose(swapped[1], x[0], atol=1e-4)
    half = mixstyle(x, swap, torch.full((2,), 0.5))  # mean (1 + 12) / 2, std (1 + 2) / 2
    assert torch.allclose(half[0].mean(), torch.tensor(6.5), atol=1e-4)
    assert torch.allclose(half[0].std(unbiased=False), torch.tensor(1.5), atol=1e-4)
    x.requires_grad_(True)
    mixstyle(x, swap, torch.full((2,), 0.3)).sum().backward()
    assert x.grad is not None  # content keeps its gradient; the statistics are constants


def test_hooks_mix_in_training_mode_only_and_come_off():
    model = create_classifier("small-cnn", image_size=32)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def run(training: bool) -> torch.Tensor:  # from the same weights and BatchNorm statistics each time
        model.load_state_dict(start)
        model.train(training)
        torch.manual_seed(0)  # dropout
        with torch.no_grad():
            return model(x)

    plain_eval, plain_train = run(False), run(True)
    mix = MixStyle("small-cnn", model, p=1.0)
    assert len(mix.handles) == 3
    mix.next_batch(4, torch.Generator().manual_seed(0))
    assert not torch.allclose(run(True), plain_train)
    assert torch.equal(run(False), plain_eval)  # inference untouched
    mix.remove()
    assert torch.equal(run(True), plain_train)


def test_draws_follow_p_and_repeat_with_the_generator():
    model = create_classifier("small-cnn", image_size=32)
    off = MixStyle("small-cnn", model, p=0.0)
    off.next_batch(8, torch.Generator().manual_seed(0))
    assert off.draw is None
    mix, gen = MixStyle("small-cnn", model, p=0.5), torch.Generator().manual_seed(3)
    draws = []
    for _ in range(400):
        mix.next_batch(8, gen)
        draws.append(mix.draw)
    applied = [d for d in draws if d is not None]
    assert 160 < len(applied) < 240  # about half the batches
    assert all(sorted(perm.tolist()) == list(range(8)) for perm, _ in applied)
    lam = torch.cat([lam for _, lam in applied])
    # Beta(0.1, 0.1): mostly near 0 or 1
    assert float(((lam < 0.1) | (lam > 0.9)).float().mean()) > 0.6 and 0.4 < float(lam.mean()) < 0.6
    again = MixStyle("small-cnn", model, p=0.5)
    again.next_batch(8, torch.Generator().manual_seed(3))
    assert (again.draw is None) == (draws[0] is None)
    if draws[0] is not None:
        assert torch.equal(again.draw[0], draws[0][0]) and torch.equal(again.draw[1], draws[0][1])


@pytest.mark.parametrize("name", ["original-cnn", "small-cnn", "resnet18", "efficientnet_b0"])
def test_every_cnn_has_early_mixing_layers_that_see_feature_maps(name):
    model = create_classifier(name, image_size=64)
    shapes = []
    for layer in style_layers(name, model):
        layer.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    model.eval()
    model(torch.zeros(2, 3, 64, 64))
    assert len(shapes) >= 2 and all(len(s) == 4 and s[0] == 2 for s in shapes)


def test_a_model_without_feature_maps_is_refused():
    with pytest.raises(MelanoganError, match="randconv"):
        style_layers("vit_b_16", create_classifier("vit_b_16", image_size=32))
