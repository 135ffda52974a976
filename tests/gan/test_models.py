"""Every registered GAN model: shapes per resolution, forward/backward, conditioning, no batch coupling."""

from __future__ import annotations

import pytest
import torch

from melanogan.errors import MelanoganError
from melanogan.gan.models import RESOLUTIONS, create_critic, create_generator, list_architectures


@pytest.mark.parametrize("arch", list_architectures())
@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_shapes_and_backward(arch, resolution):
    g = create_generator(arch, resolution=resolution, noise_dim=16, base_channels=32)
    d = create_critic(arch, resolution=resolution, base_channels=8, norm="layer")
    z, y = torch.randn(2, 16), torch.tensor([0, 1])
    x = g(z, y)
    assert x.shape == (2, 3, resolution, resolution) and x.min() >= -1 and x.max() <= 1
    s = d(x, y)
    assert s.shape == (2,)
    s.sum().backward()
    assert all(p.grad is not None for p in g.parameters() if p.requires_grad)


def test_original_preset_widths_match_the_study():
    g = create_generator("dcgan", resolution=128, noise_dim=128, base_channels=1024, kernel_size=5)
    convs = [m for m in g.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.out_channels for c in convs] == [512, 256, 128, 64, 3]
    assert all(c.kernel_size == (5, 5) for c in convs)
    assert g.fc.out_features == 4 * 4 * 1024


@pytest.mark.parametrize("norm", ["none", "layer"])
def test_critic_output_for_a_sample_does_not_depend_on_the_batch(norm):
    torch.manual_seed(0)
    d = create_critic("dcgan", resolution=32, base_channels=8, norm=norm).train()
    x, y = torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 1, 0, 1])
    alone = d(x[:1], y[:1])
    other_batch = d(torch.cat([x[:1], torch.randn(7, 3, 32, 32) * 5]), torch.cat([y[:1], torch.ones(7).long()]))
    assert torch.allclose(alone, other_batch[:1], atol=1e-5)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm | torch.nn.Dropout) for m in d.modules())


def test_conditioning_changes_outputs():
    torch.manual_seed(0)
    g = create_generator("dcgan", resolution=32, noise_dim=16, base_channels=32).eval()
    d = create_critic("dcgan", resolution=32, base_channels=8)
    with torch.no_grad():
        d.embed.weight.normal_()
    z = torch.randn(1, 16).repeat(2, 1)
    x = g(z, torch.tensor([0, 1]))
    assert (x[0] - x[1]).abs().mean() > 1e-3
    same = torch.randn(1, 3, 32, 32).repeat(2, 1, 1, 1)
    with torch.no_grad():
        s = d(same, torch.tensor([0, 1]))
    assert abs(float(s[0] - s[1])) > 1e-4


def test_bad_model_options():
    with pytest.raises(MelanoganError, match="never batch norm"):
        create_critic("dcgan", norm="batch")
    with pytest.raises(MelanoganError, match="resolution 100"):
        create_generator("dcgan", resolution=100)
    with pytest.raises(MelanoganError, match="unknown generator"):
        create_generator("stylegan9")
