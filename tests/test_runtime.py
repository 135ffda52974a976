"""The shared training progress bar, and that both training loops drive it."""

from __future__ import annotations

from melanogan.runtime import TrainingBar


def test_training_bar_tracks_completed_steps_and_status():
    bar = TrainingBar("GAN", total=10, completed=2)
    try:
        task = bar._progress.tasks[0]
        assert (task.total, task.completed, task.fields["info"]) == (10, 2, "")
        bar.update("W 0.1")
        assert (task.completed, task.fields["info"]) == (2, "W 0.1")  # a status alone does not advance the bar
        bar.update("W 0.2", completed=5)
        assert (task.completed, task.fields["info"]) == (5, "W 0.2")
    finally:
        bar.close()
    eta_less = TrainingBar("train", total=3, eta=False)
    eta_less.close()
    assert len(eta_less._progress.columns) == len(bar._progress.columns) - 2
