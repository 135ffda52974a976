"""Every registered classifier: forward/backward; weights from a local file, ImageNet offline."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from melanogan.classify import models as models_mod
from melanogan.classify.models import create_classifier, list_classifiers
from melanogan.errors import MelanoganError

SMALL = {"vit_b_16": 32, "original-cnn": 32}


@pytest.mark.parametrize("name", list_classifiers())
def test_forward_backward(name):
    size = SMALL.get(name, 64)
    model = create_classifier(name, image_size=size)
    x = torch.randn(2, 3, size, size)
    logits = model(x)
    assert logits.shape == (2,)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.head.parameters())
    assert model.forward_features(x).shape == (2, model.feature_dim)
    with pytest.raises(MelanoganError, match="no diagnosis head"):
        model(x, with_diagnosis=True)


def test_diagnosis_head_is_an_extra_output_that_inference_never_sees(tmp_path):
    torch.manual_seed(0)
    model = create_classifier("small-cnn", 32, diagnosis_classes=5).eval()
    x = torch.randn(3, 3, 32, 32)
    logits, diagnosis = model(x, with_diagnosis=True)
    assert logits.shape == (3,) and diagnosis.shape == (3, 5)
    assert torch.equal(model(x), logits)  # the melanoma logit does not depend on the extra head
    (logits.sum() + diagnosis.sum()).backward()
    assert model.diagnosis_head.weight.grad is not None
    # a run's weights (with its diagnosis head) initialise a new model without one, or with other classes
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "run.safetensors")
    plain = create_classifier("small-cnn", 32, weights=tmp_path / "run.safetensors").eval()
    assert plain.diagnosis_head is None and torch.equal(plain(x), logits)
    other = create_classifier("small-cnn", 32, weights=tmp_path / "run.safetensors", diagnosis_classes=2)
    assert other.diagnosis_head.out_features == 2


def test_with_features_also_returns_the_backbone_features_the_heads_read():
    torch.manual_seed(0)
    model = create_classifier("small-cnn", 32, diagnosis_classes=5).eval()
    x = torch.randn(3, 3, 32, 32)
    logits, diagnosis, features = model(x, with_diagnosis=True, with_features=True)
    assert torch.equal(features, model.forward_features(x))
    assert torch.equal(logits, model.head(features).squeeze(1))
    assert torch.equal(diagnosis, model.diagnosis_head(features))
    # without the diagnosis head asked for, its place is None (what a run without the head trains with)
    plain_logits, none, same = model(x, with_features=True)
    assert none is None and torch.equal(plain_logits, logits) and torch.equal(same, features)


def test_original_cnn_matches_the_study_architecture():
    m = create_classifier("original-cnn", image_size=224)
    convs = [layer for layer in m.modules() if isinstance(layer, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128] and all(c.kernel_size == (3, 3) for c in convs)
    dense = [layer for layer in m.modules() if isinstance(layer, torch.nn.Linear)]
    assert dense[0].in_features == 128 * 26 * 26 and dense[0].out_features == 128 and dense[-1].out_features == 1
    assert any(isinstance(layer, torch.nn.Dropout) and layer.p == 0.5 for layer in m.modules())


def test_local_torchvision_state_dict_and_safetensors(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)  # stands in for a downloaded ImageNet file
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = create_classifier("resnet18", 64, weights=tmp_path / "resnet18.pth")
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "r.safetensors")
    model2 = create_classifier("resnet18", 64, weights=tmp_path / "r.safetensors")
    assert torch.equal(model2.backbone.layer4[1].bn2.weight, reference.layer4[1].bn2.weight)


def test_mismatched_and_missing_weight_files_are_clear(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(MelanoganError, match=r"do not fit resnet50.*(shape mismatch|missing)") as e:
        create_classifier("resnet50", 64, weights=tmp_path / "r18.pth")
    assert "layer" in str(e.value)
    with pytest.raises(MelanoganError, match="file not found"):
        create_classifier("resnet18", 64, weights=tmp_path / "nope.pth")
    (tmp_path / "model.pth").write_bytes(b"not a torch file")
    with pytest.raises(MelanoganError, match="never pickled models"):
        create_classifier("resnet18", 64, weights=tmp_path / "model.pth")


def test_imagenet_offline_says_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(MelanoganError) as e:
        create_classifier("efficientnet_b0", 64, weights="imagenet")
    msg = str(e.value)
    assert "offline" in msg and "--weights /path/to/efficientnet_b0_rwightman" in msg and "https://" in msg
    with pytest.raises(MelanoganError, match="no published ImageNet weights"):
        create_classifier("small-cnn", 64, weights="imagenet")
    assert models_mod.PRETRAINABLE


def test_the_pretrained_recipe_loads_a_local_efficientnet_b0_file(tmp_path):
    """`--model efficientnet_b0 --weights FILE --image-size 256` without a download: a file with
    torchvision's ImageNet keys and shapes (random values here) initialises the backbone exactly."""
    torch.manual_seed(1)
    reference = torchvision.models.efficientnet_b0(weights=None)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "effnet.safetensors")
    model = create_classifier("efficientnet_b0", 256, weights=tmp_path / "effnet.safetensors")
    assert torch.equal(model.backbone.features[0][0].weight, reference.features[0][0].weight)
    assert torch.equal(model.backbone.features[7][0].block[1][0].weight, reference.features[7][0].block[1][0].weight)
    assert model(torch.zeros(1, 3, 256, 256)).shape == (1,)


def test_instance_batch_norm_normalises_half_per_image_and_half_over_the_batch():
    from melanogan.classify.models import InstanceBatchNorm

    torch.manual_seed(0)
    ibn = InstanceBatchNorm(4).train()
    x = torch.randn(3, 4, 5, 5) * torch.tensor([1.0, 3.0, 2.0, 0.5]).view(1, 4, 1, 1) + 7.0
    y = ibn(x)
    # instance half (channels 0-1): each image's own map has mean 0 and variance 1 (weight 1, bias 0)
    assert torch.allclose(y[:, :2].mean(dim=(2, 3)), torch.zeros(3, 2), atol=1e-5)
    assert torch.allclose(y[:, :2].var(dim=(2, 3), unbiased=False), torch.ones(3, 2), atol=1e-3)
    # batch half (channels 2-3): mean 0 over the batch, not per image
    assert torch.allclose(y[:, 2:].mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5)
    assert not torch.allclose(y[:, 2:].mean(dim=(2, 3)), torch.zeros(3, 2), atol=1e-2)
    # changing another image changes the batch half of image 0, never its instance half
    x2 = x.clone()
    x2[1:] *= 5.0
    y2 = ibn(x2)
    assert torch.allclose(y2[0, :2], y[0, :2], atol=1e-5) and not torch.allclose(y2[0, 2:], y[0, 2:], atol=1e-2)
    # an image's colour/contrast (a per-channel gain and offset) leaves the instance half unchanged
    assert torch.allclose(ibn(x * 2.5 - 3.0)[:, :2], y[:, :2], atol=1e-4)
    # the affine parameters act on the instance half: exact on a constant-free constructed map
    with torch.no_grad():
        ibn.weight.copy_(torch.tensor([2.0, 1.0]))
        ibn.bias.copy_(torch.tensor([0.5, -1.0]))
    z = torch.tensor([[-1.0, 1.0], [1.0, -1.0]]).view(1, 1, 2, 2).repeat(2, 4, 1, 1)  # mean 0, var 1
    out = ibn.eval()(z)
    assert torch.allclose(out[0, 0], z[0, 0] * 2.0 + 0.5, atol=1e-4)
    assert torch.allclose(out[0, 1], z[0, 1] - 1.0, atol=1e-4)


def test_small_cnn_ibn_puts_instance_batch_norm_in_stages_two_and_three_only():
    from melanogan.classify.models import InstanceBatchNorm

    body = create_classifier("small-cnn-ibn").backbone.body
    ibn = [m for m in body if isinstance(m, InstanceBatchNorm)]
    assert [m.half * 2 for m in ibn] == [64, 128]  # the first block of the 64- and 128-channel stages
    plain = create_classifier("small-cnn").backbone.body
    assert not any(isinstance(m, InstanceBatchNorm) for m in plain)
    # same parameter count as small-cnn: the instance half's affine replaces the BatchNorm half's
    assert sum(p.numel() for p in body.parameters()) == sum(p.numel() for p in plain.parameters())
