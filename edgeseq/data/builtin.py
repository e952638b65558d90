"""Built-in synthetic data, so the demo, the reference models and the tests need no files.

Besides the pump, one small learnable problem per task shape: a sine to forecast, sines of three
frequencies to classify, noisy levels to regress, and sines to generate from their parameters.

`pump_frame` imitates a pump's sensors sampled at a fixed rate: a flow with a slow duty cycle, a
pressure that follows the flow with a lag plus a faster pulsation, a slowly drifting temperature,
and measurement noise. It is learnable (a good model beats persistence clearly) but not trivial.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from edgeseq.data.tables import Columns, Dataset, from_arrays, from_frame


def pump_frame(steps: int = 2000, seed: int = 0, period: float = 50.0) -> pd.DataFrame:
    """A (steps x 4) frame: t, flow, temperature, pressure (the natural forecasting target)."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps, dtype=np.float64)
    flow = 1.0 + 0.5 * np.sin(2 * np.pi * t / period) + 0.05 * rng.standard_normal(steps)
    lagged = np.concatenate([np.full(3, flow[0]), flow[:-3]])
    temperature = (
        40.0 + 2.0 * np.sin(2 * np.pi * t / (7 * period)) + 0.1 * rng.standard_normal(steps)
    )
    pressure = (
        2.0
        + 0.8 * lagged
        + 0.3 * np.sin(2 * np.pi * t / 13.0)
        + 0.02 * (temperature - 40.0)
        + 0.05 * rng.standard_normal(steps)
    )
    return pd.DataFrame({"t": t, "flow": flow, "temperature": temperature, "pressure": pressure})


def pump(steps: int = 2000, seed: int = 0) -> Dataset:
    """The pump frame as a forecasting Dataset: pressure from its past, flow and temperature."""
    columns = Columns(targets=("pressure",), features=("flow", "temperature"), time_col="t")
    return from_frame(pump_frame(steps, seed), columns, source="built-in pump data")


def sine_series(
    steps: int = 400, period: float = 20.0, noise: float = 0.02, seed: int = 0
) -> Dataset:
    """One recording: y(t) = sin(2 pi t / period) + noise; forecast its next values."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    y = np.sin(2 * np.pi * t / period) + noise * rng.standard_normal(steps)
    return from_arrays(np.zeros((steps, 0)), y, target_names=["y"])


def frequency_classes(n: int = 90, steps: int = 40, seed: int = 0) -> Dataset:
    """n recordings of a noisy sine at one of three frequencies; the label is the frequency."""
    rng = np.random.default_rng(seed)
    periods = {"slow": 20.0, "medium": 8.0, "fast": 4.0}
    names = list(periods)
    labels = [names[i % 3] for i in range(n)]
    t = np.arange(steps)
    x = np.stack(
        [
            np.sin(2 * np.pi * t / periods[lab] + rng.uniform(0, 2 * np.pi))
            + 0.1 * rng.standard_normal(steps)
            for lab in labels
        ]
    )[..., None]
    return from_arrays(x, labels=labels, feature_names=["signal"])


def level_regression(n: int = 60, steps: int = 30, seed: int = 0) -> Dataset:
    """n recordings of noise around a level; the target is that level (seen in every row)."""
    rng = np.random.default_rng(seed)
    levels = rng.uniform(-2, 2, n)
    x = levels[:, None, None] + 0.3 * rng.standard_normal((n, steps, 1))
    y = np.repeat(levels[:, None], steps, axis=1)
    return from_arrays(x, y, feature_names=["reading"], target_names=["level"])


def sine_from_vector(n: int = 60, steps: int = 25, seed: int = 0) -> Dataset:
    """One-to-many: a vector (amplitude, period) in, the sine it describes out."""
    rng = np.random.default_rng(seed)
    amp = rng.uniform(0.5, 2.0, n)
    period = rng.uniform(6.0, 14.0, n)
    t = np.arange(steps)
    y = amp[:, None] * np.sin(2 * np.pi * t[None] / period[:, None])
    x = np.repeat(np.stack([amp, period], axis=1)[:, None, :], steps, axis=1)
    return from_arrays(x, y, feature_names=["amplitude", "period"], target_names=["wave"])


def sensors8(steps: int = 3000, seed: int = 0) -> Dataset:
    """Eight noisy, phase-shifted sensor channels; forecast the first from all eight. The shape
    of the benchmark models (8 inputs -> 2 x 64 -> 1 output)."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps, dtype=np.float64)[:, None]
    phase = np.linspace(0, np.pi, 8)[None, :]
    period = np.linspace(20.0, 60.0, 8)[None, :]
    x = np.sin(2 * np.pi * t / period + phase) + 0.05 * rng.standard_normal((steps, 8))
    frame = pd.DataFrame(x, columns=[f"s{i}" for i in range(8)])
    columns = Columns(targets=("s0",), features=tuple(f"s{i}" for i in range(1, 8)))
    return from_frame(frame, columns, source="built-in 8-sensor data")
