from __future__ import annotations

import pytest

from melanogan.gan.config import load_config


@pytest.fixture()
def tiny_cfg():
    """A GAN small enough for second-scale CPU tests."""
    return load_config("default", resolution=32, generator_channels=64, critic_channels=16, batch_size=16,
                       n_critic=2, steps=12, log_every=2, checkpoint_every=4, sample_every=6, lr=5e-4,
                       ema_decay=0.9, keep_checkpoints=10)
