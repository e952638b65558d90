"""Small learnable toy problems, one per task shape, as edgeseq Datasets."""

from __future__ import annotations

import numpy as np

from edgeseq.data import Dataset, from_arrays


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
