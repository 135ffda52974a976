"""A trained classifier, a prepared real dataset and a synthetic set, shared by the web-app tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def serve_inputs(demo_prepared, tmp_path_factory):
    """(run_dir, real_dir, synthetic_dir): small-cnn trained briefly on the demo phantoms, and 12
    synthetic images of each class from a GAN trained for two steps (quality is not the point here)."""
    from melanogan.classify.train import TrainConfig, train_classifier
    from melanogan.gan.config import load_config
    from melanogan.gan.sample import generate
    from melanogan.gan.train import train_gan

    root = tmp_path_factory.mktemp("serve")
    cfg = TrainConfig(model="small-cnn", image_size=48, epochs=2, batch_size=16, workers=0)
    train_classifier(demo_prepared, root / "run", cfg, progress=False)
    gan_cfg = load_config("default", resolution=32, generator_channels=32, critic_channels=8, batch_size=8,
                          n_critic=1, steps=2, checkpoint_every=2, sample_every=2, log_every=1)
    train_gan(demo_prepared, root / "gan", gan_cfg, progress=False)
    for label in ("melanoma", "other"):
        generate(root / "gan", 12, label, root / "syn", seed=1)
    return root / "run", demo_prepared, root / "syn"
