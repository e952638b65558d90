"""Embedded use of edgeseq: your own sensor loop, one sample in, one prediction out.

Run it on the board with the bundle's model:
    /opt/edgeseq/venv/bin/python sensor_loop.py /etc/edgeseq/model.onnx
Replace `read_sensor` with your driver (I2C, SPI, serial, a socket...). The stream keeps the
recurrent state between samples, so each step costs one recurrent update, in microseconds.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np

import edgeseq


def read_sensor(t: int, n_features: int) -> np.ndarray:
    """A stand-in for a real sensor: slow waves plus a little noise."""
    base = np.array([math.sin(0.05 * t + k) for k in range(n_features)], np.float32)
    return base + np.float32(0.01) * np.random.default_rng(t).standard_normal(
        n_features, np.float32
    )


def main(model_path: str, samples: int = 200, period_s: float = 0.0) -> None:
    model = edgeseq.load(model_path)  # validates the file and loads the cached kernels
    stream = model.stream()
    saved = None
    for t in range(samples):
        y = stream.step(read_sensor(t, model.n_features))
        if t % 50 == 0:
            print(f"t={t:4d} prediction={np.round(y, 4).tolist()}")
        if t == samples // 2:
            saved = stream.state  # a copy: persist it, restore it after a restart
        if period_s:
            time.sleep(period_s)
    stream.state = saved  # back to the middle of the run, exactly
    print(
        "state restored; next prediction:",
        np.round(stream.step(read_sensor(0, model.n_features)), 4).tolist(),
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/etc/edgeseq/model.onnx")
