"""The training run as a whole: reproducible, resumable, self-describing, and honest about BPTT."""

from __future__ import annotations

import json

import pytest
import torch

from edgeseq.errors import CheckpointError, UsageError
from edgeseq.train import run_checkpoint as checkpoint
from edgeseq.train.pipeline import TrainConfig, train
from tests import toys

SMALL = dict(hidden=8, epochs=4, patience=10, window=32)


def _weights(run_dir):
    return checkpoint.load(run_dir).weights


def test_the_same_seed_gives_the_same_model_bit_for_bit(tmp_path):
    cfg = TrainConfig(**SMALL, seed=7)
    train(toys.sine_series(), cfg, tmp_path / "a")
    train(toys.sine_series(), cfg, tmp_path / "b")
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_different_seed_gives_a_different_model(tmp_path):
    train(toys.sine_series(), TrainConfig(**SMALL, seed=1), tmp_path / "a")
    train(toys.sine_series(), TrainConfig(**SMALL, seed=2), tmp_path / "b")
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_run_ends_where_an_uninterrupted_run_ends(tmp_path):
    full = dict(SMALL, epochs=6, patience=100)
    train(toys.sine_series(), TrainConfig(**full), tmp_path / "straight")
    train(toys.sine_series(), TrainConfig(**dict(full, epochs=3)), tmp_path / "resumed")
    result = train(toys.sine_series(), TrainConfig(**full), tmp_path / "resumed", resume=True)
    assert result.fit_state.epoch == 6
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_with_a_different_architecture_is_refused(tmp_path):
    train(toys.sine_series(), TrainConfig(**SMALL), tmp_path / "run")
    with pytest.raises(UsageError, match="cannot resume"):
        train(
            toys.sine_series(), TrainConfig(**dict(SMALL, hidden=9)), tmp_path / "run", resume=True
        )


def test_the_run_directory_describes_itself(tmp_path):
    result = train(toys.frequency_classes(), TrainConfig(task="classify", **SMALL), tmp_path / "r")
    ckpt = checkpoint.load(tmp_path / "r")
    assert ckpt.model_spec.task == "classify"
    assert ckpt.data_spec.labels == ("fast", "medium", "slow")
    assert ckpt.data_spec.features == ("signal",)
    assert ckpt.training["config"]["hidden"] == 8
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert {"accuracy", "macro_f1"} <= set(metrics["test"]) and "accuracy" in metrics["baseline"]
    assert metrics["test"] == result.metrics["test"]
    assert (tmp_path / "r" / "command.txt").read_text().strip()


def test_the_checkpoint_loads_without_unpickling_objects(tmp_path):
    train(toys.sine_series(), TrainConfig(**SMALL), tmp_path / "r")
    payload = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert payload["format"] == "edgeseq.checkpoint"


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint", b"PK\x03\x04garbage" + bytes(100)],
    ids=["empty", "text", "zip"],
)
def test_a_corrupt_checkpoint_is_refused_with_a_clear_error(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable edgeseq checkpoint"):
        checkpoint.load(path)


def test_a_checkpoint_of_some_other_object_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"weights": {"w": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match="not an edgeseq checkpoint"):
        checkpoint.load(path)


def test_truncated_bptt_makes_one_update_per_chunk_and_carries_state(tmp_path):
    calls = []
    cfg = TrainConfig(hidden=8, epochs=1, tbptt=25, batch_size=1, val_size=0, test_size=0.2)
    data = toys.sine_series(steps=500)
    original = torch.optim.Adam.step

    def counting_step(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    torch.optim.Adam.step = counting_step
    try:
        train(data, cfg, tmp_path / "r")
    finally:
        torch.optim.Adam.step = original
    train_steps = 400  # 500 rows minus the 20% test split; one window = the whole sequence
    assert len(calls) == -(-train_steps // 25)


def test_gradient_norms_before_clipping_are_logged_every_epoch(tmp_path):
    result = train(toys.sine_series(), TrainConfig(**dict(SMALL, clip=0.01)), tmp_path / "r")
    history = result.fit_state.history
    assert len(history) == 4
    assert all(h.grad_norm_max > 0.01 for h in history)  # logged before clipping to 0.01
    assert all(h.clipped_fraction > 0.9 for h in history)


def test_the_plots_time_axis_is_the_time_columns_values(tmp_path):
    """A forecast's test panel is plotted against --time-col's values (dates stay dates)."""
    import numpy as np
    import pandas as pd

    from edgeseq.data.tables import Columns, from_frame
    from edgeseq.train.evaluate import evaluate

    days = pd.date_range("2020-01-01", periods=200, freq="D")
    frame = pd.DataFrame({"day": days.strftime("%Y-%m-%d"), "v": np.sin(np.arange(200) / 5.0)})
    data = from_frame(frame, Columns(targets=("v",), time_col="day"))
    result = train(data, TrainConfig(**dict(SMALL, target_transform="none")), tmp_path / "r")
    example = evaluate(result.model, result.prepared, result.prepared.test).example
    assert example["t"].dtype.kind == "M" and example["t"][0] >= np.datetime64("2020-06-01")
    assert (tmp_path / "r" / "plot.png").stat().st_size > 0
