"""Built-in synthetic sensor data, so the demo and the tests run with no files at all.

`pump_frame` imitates a pump's sensors sampled at a fixed rate: a flow with a slow duty cycle, a
pressure that follows the flow with a lag plus a faster pulsation, a slowly drifting temperature,
and measurement noise. It is learnable (a good model beats persistence clearly) but not trivial.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


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
