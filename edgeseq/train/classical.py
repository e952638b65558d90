"""A classical forecaster beside the naive baselines: Holt-Winters exponential smoothing
(statsmodels), the honest bar a trending, seasonal series sets for a recurrent network.

Fitted once on the training rows; then it forecasts one step ahead over the held-out rows
without refitting, each forecast from the rows before it (statsmodels' one-step predictions
with the fitted parameters over the whole series), as the network is scored.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from edgeseq import config

NAME = "holt_winters"


def why_not(n_rows: int, n_targets: int, horizon: int, recordings: int) -> str | None:
    """Why no classical baseline is fitted (None: it is)."""
    if n_targets != 1:
        return "the classical baseline forecasts one target"
    if horizon != 1:
        return "the classical baseline forecasts one step ahead (--horizon 1)"
    if recordings != 1:
        return "the classical baseline fits one series (the data has several recordings)"
    if n_rows > config.HOLT_WINTERS_MAX_ROWS:
        most = config.HOLT_WINTERS_MAX_ROWS
        return f"the series has {n_rows} rows; the classical baseline fits at most {most}"
    return None


def _model(series: np.ndarray, season: int | None) -> Any:
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    seasonal = season is not None and season >= 2
    return ExponentialSmoothing(
        series,
        trend="add",
        damped_trend=True,
        seasonal="add" if seasonal else None,
        seasonal_periods=season if seasonal else None,
        initialization_method="estimated",
    )


def one_step_forecasts(series: np.ndarray, train_rows: int, season: int | None) -> np.ndarray:
    """For every row r of `series` (1-D), the forecast of row r from rows < r, with the
    parameters fitted on rows < train_rows only."""
    values = np.asarray(series, np.float64)
    if season is not None and train_rows < 2 * season + 2:
        season = None  # too few training rows to estimate a season: trend only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' convergence and frequency chatter
        fitted = _model(values[:train_rows], season).fit()
        return np.asarray(_model(values, season).predict(fitted.params, 0, len(values) - 1))
