"""Conditional WGAN-GP: models, losses (pure functions), training, sampling."""
