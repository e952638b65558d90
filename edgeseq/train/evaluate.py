"""Score a trained model on held-out segments, next to the naive baseline for its task.

Everything is measured in physical units, streaming-style: each segment runs from its first row
with the state carried, exactly as a device would see it; only rows in the held-out region count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeseq.data import target_transform
from edgeseq.data.prepare import AUTOREGRESSIVE_TASKS, Encoded, Prepared
from edgeseq.errors import UsageError
from edgeseq.train import classical
from edgeseq.train.networks import predict
from edgeseq.train.scores import classification_scores, regression_scores

NONE = target_transform.NONE


@dataclass
class Evaluation:
    scores: dict[str, Any]
    baselines: dict[str, dict[str, Any]]
    # What the plot shows: name -> (x positions, truth, prediction) of one example segment.
    example: dict[str, np.ndarray] = field(default_factory=dict)


def raw_outputs(model: nn.Module, enc: Encoded) -> np.ndarray:
    """Model output at every step of a segment, still in scaled units: (T, output_size)."""
    return predict(model, torch.from_numpy(enc.x)[None])[0].numpy()


def _unscale(values: np.ndarray, prepared: Prepared) -> np.ndarray:
    scaling = prepared.data_spec.target_scaling
    assert scaling is not None
    return values * np.asarray(scaling.std) + np.asarray(scaling.mean)


def _forecast(
    model: nn.Module, p: Prepared, segs: list[Encoded], season: int | None, with_classical: bool
) -> Evaluation:
    h = p.horizon
    if season is not None and season < h:
        raise UsageError(f"--season {season} must be at least --horizon {h}")
    preds, truths, naive, seasonal = [], [], [], []
    example: dict[str, np.ndarray] = {}
    for e in segs:
        n_t = e.targets.shape[1]
        out = _unscale(raw_outputs(model, e).reshape(len(e.x), h, n_t), p)
        out = target_transform.inverse(out, e.targets, p.data_spec.target_transform or NONE)
        pos = np.flatnonzero(e.mask)
        ahead = pos[:, None] + np.arange(1, h + 1)[None, :]  # (P, h) rows being forecast
        preds.append(out[pos])
        truths.append(e.targets[ahead])
        naive.append(np.repeat(e.targets[pos][:, None, :], h, axis=1))
        if season is not None:
            back = np.where(ahead - season >= 0, ahead - season, pos[:, None])
            seasonal.append(e.targets[back])
        if not example:
            example = {"t": _when(e, pos + 1), "truth": e.targets[pos + 1, 0],
                       "pred": out[pos, 0, 0]}  # fmt: skip
    pred, truth = np.concatenate(preds), np.concatenate(truths)
    baselines = {"persistence": regression_scores(np.concatenate(naive), truth)}
    if season is not None:
        baselines["seasonal_persistence"] = regression_scores(np.concatenate(seasonal), truth)
    if with_classical:
        baselines[classical.NAME] = _classical(p, segs, season, truth)
    scores: dict[str, Any] = dict(regression_scores(pred, truth))
    if h > 1:
        scores["rmse_by_step"] = [
            float(np.sqrt(np.mean((pred[:, k] - truth[:, k]) ** 2))) for k in range(h)
        ]
    return Evaluation(scores, baselines, example)


def _when(e: Encoded, rows: np.ndarray) -> np.ndarray:
    """The time column's values at these rows (the plot's x axis), else the row numbers."""
    return e.times[rows] if e.times is not None else rows


def _classical(
    p: Prepared, segs: list[Encoded], season: int | None, truth: np.ndarray
) -> dict[str, Any]:
    """Holt-Winters (classical.py) fitted on the training rows, one step ahead over the
    scored rows; or a note saying why not."""
    train_rows = {e.key: len(e.targets) for e in p.train}
    rows = sum(len(e.targets) for e in segs)
    keys = {e.key for e in segs} | set(train_rows)
    why = classical.why_not(rows, len(p.data_spec.targets), p.horizon, len(keys))
    if why is not None:
        return {"note": why}
    forecasts = []
    for e in segs:
        series = e.targets[:, 0]
        one_step = classical.one_step_forecasts(series, train_rows[e.key], season)
        forecasts.append(one_step[np.flatnonzero(e.mask) + 1])
    return regression_scores(np.concatenate(forecasts).reshape(truth.shape), truth)


def _last_outputs(model: nn.Module, segs: list[Encoded]) -> np.ndarray:
    return np.stack([raw_outputs(model, e)[np.flatnonzero(e.mask)[-1]] for e in segs])


def _classify(
    model: nn.Module, p: Prepared, segs: list[Encoded], train: list[Encoded]
) -> Evaluation:
    labels = list(p.data_spec.labels)
    pred = _last_outputs(model, segs).argmax(axis=1)
    truth = np.array([e.label for e in segs])
    majority = int(np.bincount([e.label for e in train], minlength=len(labels)).argmax())
    base = classification_scores(np.full_like(truth, majority), truth, labels)
    return Evaluation(
        classification_scores(pred, truth, labels), {"majority_class": base}, {"pred": pred}
    )


def _regress(
    model: nn.Module, p: Prepared, segs: list[Encoded], train: list[Encoded]
) -> Evaluation:
    pred = _unscale(_last_outputs(model, segs), p)
    truth = np.stack([e.targets[-1] for e in segs])
    mean = np.mean([e.targets[-1] for e in train], axis=0)
    base = regression_scores(np.broadcast_to(mean, truth.shape), truth)
    scores = regression_scores(pred, truth)
    return Evaluation(scores, {"train_mean": base}, {"truth": truth[:, 0], "pred": pred[:, 0]})


def _generate(
    model: nn.Module, p: Prepared, segs: list[Encoded], train: list[Encoded]
) -> Evaluation:
    longest = max(len(e.targets) for e in train + segs)
    sums = np.zeros((longest, train[0].targets.shape[1]))
    counts = np.zeros((longest, 1))
    for e in train:
        sums[: len(e.targets)] += e.targets
        counts[: len(e.targets)] += 1
    overall = np.concatenate([e.targets for e in train]).mean(axis=0)
    profile = np.where(counts > 0, sums / np.maximum(counts, 1), overall)
    preds, truths, base = [], [], []
    for e in segs:
        pos = np.flatnonzero(e.mask)
        preds.append(_unscale(raw_outputs(model, e), p)[pos])
        truths.append(e.targets[pos])
        base.append(profile[pos])
    first = segs[0]
    example = {
        "t": _when(first, np.arange(len(first.targets))),
        "truth": first.targets[:, 0],
        "pred": _unscale(raw_outputs(model, first), p)[:, 0],
    }
    truth = np.concatenate(truths)
    return Evaluation(
        regression_scores(np.concatenate(preds), truth),
        {"mean_profile": regression_scores(np.concatenate(base), truth)},
        example,
    )


def evaluate(
    model: nn.Module,
    prepared: Prepared,
    segments: list[Encoded],
    *,
    season: int | None = None,
    classical_baseline: bool = True,
) -> Evaluation:
    """Scores of `model` on `segments` and of the task's naive baselines on the same targets
    (and for a forecast a classical one, unless `classical_baseline` is False)."""
    if not segments:
        raise UsageError("nothing to evaluate: the held-out split is empty")
    task = prepared.task
    if task in AUTOREGRESSIVE_TASKS:
        return _forecast(model, prepared, segments, season, classical_baseline)
    if task == "classify":
        return _classify(model, prepared, segments, prepared.train)
    if task == "regress":
        return _regress(model, prepared, segments, prepared.train)
    return _generate(model, prepared, segments, prepared.train)
