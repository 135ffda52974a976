"""melanogan: melanoma detection with a conditional WGAN-GP against class imbalance, evaluated honestly."""

__version__ = "0.1.0"
