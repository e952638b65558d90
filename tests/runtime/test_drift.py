"""Long streams stay within float32 error of a float64 reference: no drift, no NaN.

The reference is the graph evaluated on the whole sequence by the NumPy ONNX reference, whose
recurrences run in float64 from the first step to the last.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgeseq

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "export" / "pump-lstm.onnx"
# Outputs are physical units of order 1: float32 kernels may differ from float64 by this much.
DRIFT_TOLERANCE = 1e-4
BLOCK = 10_000


def _signal(steps: int) -> np.ndarray:
    t = np.arange(steps, dtype=np.float64)[:, None]
    x = np.hstack([1 + 0.5 * np.sin(t / 8), 40 + 2 * np.sin(t / 350), 2.5 + 0.3 * np.sin(t / 2)])
    return x.astype(np.float32)


def _max_gap(steps: int) -> float:
    model = edgeseq.load(MODEL)
    reference = edgeseq.load(MODEL, backend="numpy")
    xs = _signal(steps)
    stream, worst = model.stream(), 0.0
    expected = reference.run({"x": xs[None]})["y"][0]
    for start in range(0, steps, BLOCK):
        got = stream.feed(xs[start : start + BLOCK])
        assert np.isfinite(got).all()
        worst = max(worst, float(np.abs(got - expected[start : start + BLOCK]).max()))
    return worst


def test_twenty_thousand_streamed_steps_match_the_float64_reference():
    assert _max_gap(20_000) < DRIFT_TOLERANCE


@pytest.mark.slow
def test_one_million_streamed_steps_match_the_float64_reference():
    gap = _max_gap(1_000_000)
    print(f"max abs gap over 1,000,000 steps: {gap:.2e}")
    assert gap < DRIFT_TOLERANCE
