"""Every task shape with every cell learns a toy problem: loss falls and the toy is predicted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeseq.data.windows import make_windows
from edgeseq.train.fit import masked_loss
from edgeseq.train.networks import build_model
from edgeseq.train.pipeline import TrainConfig, train
from tests import toys

CELLS = ["rnn", "lstm", "gru"]
# A trained model's training loss must fall below this share of the untrained model's.
LOSS_DROP = 0.3

# task -> (toy dataset, config overrides, score key, bound: model score vs its baseline)
CASES = {
    "forecast": (toys.sine_series, {"window": 40}, "rmse", 0.5),
    "seq2seq": (toys.sine_series, {"window": 40, "horizon": 4}, "rmse", 0.5),
    "classify": (toys.frequency_classes, {"window": 20, "stride": 5}, "accuracy", None),
    "regress": (toys.level_regression, {}, "rmse", 0.5),
    "generate": (toys.sine_from_vector, {}, "rmse", 0.5),
}
MIN_ACCURACY = 0.9


def _untrained_loss(result, cfg: TrainConfig) -> float:
    """Training-window loss of the same architecture with the seed's initial weights."""
    torch.manual_seed(cfg.seed)
    fresh = build_model(result.model.spec).eval()
    windows = make_windows(
        result.prepared.train, None, None, last_only=cfg.task in ("classify", "regress")
    )
    with torch.no_grad():
        y, _ = fresh(windows.x)
        return float(masked_loss(y, windows.y, windows.mask, cfg.task == "classify"))


def _trained_loss(result, cfg: TrainConfig) -> float:
    windows = make_windows(
        result.prepared.train, None, None, last_only=cfg.task in ("classify", "regress")
    )
    with torch.no_grad():
        y, _ = result.model.eval()(windows.x)
        return float(masked_loss(y, windows.y, windows.mask, cfg.task == "classify"))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("task", list(CASES))
def test_each_task_shape_and_cell_learns_its_toy_problem(task, cell, tmp_path):
    make_data, overrides, key, bound = CASES[task]
    cfg = TrainConfig(task=task, cell=cell, hidden=16, epochs=60, patience=60, lr=1e-2, **overrides)
    result = train(make_data(), cfg, tmp_path / "run")

    assert _trained_loss(result, cfg) < LOSS_DROP * _untrained_loss(result, cfg)
    score = result.metrics["test"][key]
    if key == "accuracy":
        assert score >= MIN_ACCURACY, result.metrics["test"]
    else:
        baseline = result.metrics["baseline"][key]
        assert score < bound * baseline, (score, baseline)
    assert (tmp_path / "run" / "plot.png").stat().st_size > 10_000
    assert np.isfinite(result.metrics["max_grad_norm_before_clipping"])
