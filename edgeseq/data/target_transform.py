"""A forecast's target transform on whole recordings, in NumPy: what training feeds the network,
what it learns to predict, and the inverse back to physical units (spec.TargetTransform).

The exported graph computes the same, one sample at a time with the past values kept as state
(transform_graph.py); the runtime's TransformIn/TransformOut cells do it in the fused kernel.
A recording is treated as a stream from a fresh state: its first value primes the past, so the
first change is 0, exactly as a fresh stream's is.
"""

from __future__ import annotations

import numpy as np

from edgeseq.errors import DataError
from edgeseq.spec import TargetTransform

NONE = TargetTransform()


def levels(targets: np.ndarray, transform: TargetTransform, what: str = "the target") -> np.ndarray:
    """v: the targets (T, n) in the units the transform differences (log or as they are)."""
    values = np.asarray(targets, np.float64)
    if not transform.log:
        return values
    if not np.all(values > 0):
        worst = float(np.min(values))
        raise DataError(
            f"--target-transform {transform.name} takes the log of {what}, which reaches "
            f"{worst:g}; expected values > 0 (choose diff or seasonal instead)"
        )
    return np.log(values)


def history(v: np.ndarray, lag: int) -> np.ndarray:
    """(lag + T, n): the `lag` values before the first (primed with the first one), then v."""
    return np.concatenate([np.repeat(v[:1], lag, axis=0), v], axis=0)


def _change(new: np.ndarray, old: np.ndarray, transform: TargetTransform) -> np.ndarray:
    """new relative to old: log(new / old) (a ratio: no cancellation of two rounded logs, so
    float32 graphs agree on it), or new - old."""
    return np.log(new / old) if transform.log else new - old


def inputs(targets: np.ndarray, transform: TargetTransform) -> np.ndarray:
    """What the network reads for the targets at each step: the change since `lag` steps
    back, or the level (its log)."""
    v = levels(targets, transform)
    if not transform.lag:
        return v
    values = np.asarray(targets, np.float64)
    return _change(values, history(values, transform.lag)[: len(values)], transform)


def bases(targets: np.ndarray, transform: TargetTransform, horizon: int) -> np.ndarray:
    """(T, horizon, n) physical: what the forecast of step t + k changes from: the last value
    (diff), the value at t + k - season (seasonal). Only for transforms with a lag."""
    values = np.asarray(targets, np.float64)
    if transform.seasonal:
        hist = history(values, transform.lag)  # hist[t + k] = value at t + k - lag
        return np.stack([hist[k : k + len(values)] for k in range(1, horizon + 1)], axis=1)
    return np.repeat(values[:, None, :], horizon, axis=1)


def inverse(out: np.ndarray, targets: np.ndarray, transform: TargetTransform) -> np.ndarray:
    """Physical forecasts from the network's (unscaled) outputs (T, horizon, n), given the
    recording's targets up to each step (only values at or before t are read for row t)."""
    if not transform.lag:
        return np.exp(out) if transform.log else out
    base = bases(targets, transform, out.shape[1])
    return base * np.exp(out) if transform.log else base + out


def ahead(targets: np.ndarray, transform: TargetTransform, horizon: int) -> np.ndarray:
    """(T, horizon, n): what the network learns to predict for step t + k (valid while
    t + k < T; rows beyond are 0)."""
    v = levels(targets, transform)  # checks the log's domain
    values = np.asarray(targets, np.float64)
    base = bases(values, transform, horizon) if transform.lag else None
    out = np.zeros((len(v), horizon, v.shape[1]))
    for k in range(1, horizon + 1):
        rows = len(v) - k
        if base is None:
            out[:rows, k - 1] = v[k:]
        else:
            out[:rows, k - 1] = _change(values[k:], base[:rows, k - 1], transform)
    return out
