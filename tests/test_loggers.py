"""--logger csv|tensorboard: the scalars of stats.jsonl also reach the experiment loggers."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from melanogan.errors import MelanoganError
from melanogan.runtime import fabric_loggers


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_tensorboard_event_file_holds_the_classifier_scalars(demo_prepared, tmp_path):
    pytest.importorskip("tensorboard", reason="the dev extra installs TensorBoard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from melanogan.classify.train import TrainConfig, train_classifier

    run = tmp_path / "run"
    train_classifier(demo_prepared, run, TrainConfig(image_size=32, epochs=2, batch_size=8, workers=0),
                     progress=False, logger="tensorboard")
    stats = _jsonl(run / "stats.jsonl")
    events = EventAccumulator(str(next((run / "tensorboard").glob("version_*")))).Reload()
    assert {"val_auc", "train_loss", "val_loss", "lr"} <= set(events.Tags()["scalars"])
    logged = events.Scalars("val_auc")
    assert [e.step for e in logged] == [1, 2]
    assert [e.value for e in logged] == pytest.approx([r["val_auc"] for r in stats], abs=1e-6)


def test_csv_logger_holds_the_gan_scalars(demo_prepared, tmp_path):
    from melanogan.gan.config import load_config
    from melanogan.gan.train import train_gan

    cfg = load_config("default", resolution=32, steps=2, batch_size=8, checkpoint_every=2, sample_every=2, log_every=1)
    cfg = cfg.model_copy(update={"generator_channels": 32, "critic_channels": 8, "n_critic": 1})
    train_gan(demo_prepared, tmp_path / "gan", cfg, progress=False, logger="csv")
    stats = _jsonl(tmp_path / "gan" / "stats.jsonl")
    table = pd.read_csv(next((tmp_path / "gan" / "csv").glob("version_*/metrics.csv")))
    assert list(table["step"]) == [1, 2]
    assert table["wasserstein"].tolist() == pytest.approx([r["wasserstein"] for r in stats], abs=1e-5)


def test_unknown_logger_is_refused(tmp_path):
    assert fabric_loggers(None, tmp_path) == []
    with pytest.raises(MelanoganError, match="use csv or tensorboard"):
        fabric_loggers("wandb", tmp_path)
