"""melanogan: melanoma detection with a conditional WGAN-GP against class imbalance, evaluated honestly.

The Python API (one function per CLI verb, see `melanogan.api`) is importable from here:
`melanogan.prepare`, `audit`, `pack`, `unpack`, `train_gan`, `generate`, `import_synthetic`, `evaluate_gan`, `train`,
`evaluate`, `study`, `predict`, `explain`, `export`, `calibrate`, `card`. They are loaded on first use, so that
`import melanogan` stays light (no torch) for the CLI's start-up.
"""

__version__ = "0.1.0"

_API = ("prepare", "audit", "pack", "unpack",
        "train_gan", "generate", "import_synthetic", "evaluate_gan", "train", "evaluate", "study",
        "predict", "explain", "export", "calibrate", "card")


def __getattr__(name: str):
    if name in _API:
        from melanogan import api

        return getattr(api, name)
    raise AttributeError(f"module 'melanogan' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(["__version__", *_API])
