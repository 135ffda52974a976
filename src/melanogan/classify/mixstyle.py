"""MixStyle (Zhou et al., "Domain generalization with MixStyle", ICLR 2021): a lever of README's
"Models that travel", weight-free style randomisation between sources.

A CNN's early feature maps carry an image's "style" (colour, illumination, texture: what a clinic's
dermoscope and camera add) in their per-channel means and standard deviations, and its content
(the lesion) in the normalised maps. During training, MixStyle replaces each image's early-feature
statistics by a mix of its own and another batch image's, so the model sees each lesion in styles
between those of the sources it trains on and leans less on any one of them. With two training
sources and a random partner, about half of the pairs cross sources (the paper's "random shuffle"
variant, which needs no source labels). Nothing is learnt or stored: inference is untouched, and a
checkpoint of a MixStyle run loads as any other.

Applied with probability `p` per batch after the first stages (the paper: after ResNet's layer1-3,
never the last, which carries the class), with mixing weights lambda ~ Beta(alpha, alpha), alpha 0.1
(most lambdas near 0 or 1: mostly one image's style, sometimes an even mix).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from melanogan.errors import MelanoganError


def mixstyle(x: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x (B, C, H, W): each image normalised by its per-channel mean and std, then given the statistics
    lam * its own + (1 - lam) * image perm[i]'s. Statistics carry no gradient (as in the paper: the
    style is a perturbation, not something to learn through). Computed in float32 under autocast."""
    xf = x.float()
    mu = xf.mean(dim=(2, 3), keepdim=True).detach()
    sig = (xf.var(dim=(2, 3), keepdim=True, unbiased=False) + eps).sqrt().detach()
    lam = lam.to(xf.device, xf.dtype).view(-1, 1, 1, 1)
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sig_mix = lam * sig + (1 - lam) * sig[perm]
    return ((xf - mu) / sig * sig_mix + mu_mix).to(x.dtype)


def style_layers(name: str, model: nn.Module) -> list[nn.Module]:
    """The modules after which MixStyle mixes, per registered architecture: the early stages, never
    the last (its statistics carry the class more than the style)."""
    backbone = model.backbone
    if name in ("small-cnn", "small-cnn-ibn"):  # the pools closing stages 1-3 of 4
        return [m for m in backbone.body if isinstance(m, nn.MaxPool2d)][:3]
    if name == "original-cnn":  # after the first two of three conv blocks
        return [m for m in backbone.convs if isinstance(m, nn.MaxPool2d)][:2]
    if name in ("resnet18", "resnet50"):
        return [backbone.layer1, backbone.layer2, backbone.layer3]
    if name == "efficientnet_b0":  # features[1..3]: the 16-, 24- and 40-channel stages of 7
        return [backbone.features[i] for i in (1, 2, 3)]
    raise MelanoganError(f"--style-augment mixstyle needs a CNN; {name} has no feature maps to mix "
                         "(use randconv, which works on the images).")


class MixStyle:
    """Forward hooks that mix styles after `style_layers(name, model)` while the model is in training
    mode; `remove()` takes them off. Draws (apply or not, partner, lambda) come from the generator
    given to `next_batch`, once per batch, so that runs repeat on CPU; every hooked layer of one
    forward uses the same draws."""

    def __init__(self, name: str, model: nn.Module, p: float = 0.5, alpha: float = 0.1) -> None:
        if not 0.0 <= p <= 1.0 or not alpha > 0:
            raise ValueError(f"MixStyle p={p}, alpha={alpha}: use p in [0, 1] and alpha > 0")
        self.p, self.alpha = p, alpha
        self.layers = style_layers(name, model)
        self.draw: tuple[torch.Tensor, torch.Tensor] | None = None
        self.handles = [layer.register_forward_hook(self._hook) for layer in self.layers]

    def next_batch(self, n: int, g: torch.Generator | None = None) -> None:
        """Draw this batch's mixing (or none, with probability 1 - p) from `g`; call before each training
        forward."""
        if n < 2 or float(torch.rand(1, generator=g)) >= self.p:
            self.draw = None
            return
        perm = torch.randperm(n, generator=g)
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g)))  # Beta with a seed
        self.draw = (perm, torch.from_numpy(rng.beta(self.alpha, self.alpha, n)).float())

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor):
        if not module.training or self.draw is None or len(output) != len(self.draw[0]):
            return None  # evaluation, a batch drawn without mixing, or a forward of another batch size
        perm, lam = self.draw
        return mixstyle(output, perm.to(output.device), lam)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
