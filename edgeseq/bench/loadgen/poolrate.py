"""The runtime's own rate on the model: `model.pool(streams).step(ids, X)` samples/s.

Measured in a short-lived process of its own (`python -m edgeseq.bench.loadgen.poolrate MODEL`), the
only part of the load test that imports the runtime: the load generator's process must never map
Numba's LLVM beside the daemon it measures (see the package's docstring). Beside the daemon's
figure it says what share of the runtime's speed the daemon delivers to its clients.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from edgeseq.errors import EdgeseqError

WARM_STEPS = 20  # untimed steps first: the first compiles or loads the kernels
TIMEOUT = 600.0  # seconds the child may take in all (a cold Numba cache compiles)


def measure_in_child(model: Path, streams: int, seconds: float) -> float:
    """samples/s of the runtime's pool, measured by a child process."""
    cmd = [
        sys.executable,
        "-m",
        "edgeseq.bench.loadgen.poolrate",
        str(model),
        "--streams",
        str(streams),
        "--seconds",
        str(seconds),
    ]
    # One kernel thread, as the daemon steps its pool (service.one_kernel_thread): the same work
    # it does, and a parallel step beside a busy core would measure the neighbours instead.
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=TIMEOUT + seconds, env=env
        )
    except subprocess.TimeoutExpired:
        raise EdgeseqError(f"measuring the runtime's pool took over {TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        raise EdgeseqError(f"measuring the runtime's pool failed:\n{done.stderr[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["samples_per_s"])


def measure(model: Path, streams: int, seconds: float) -> float:
    """samples/s of `model.pool(streams).step(ids, X)`, in this process (imports the runtime)."""
    import numpy as np

    import edgeseq

    loaded = edgeseq.load(model)
    pool = loaded.pool(streams)
    ids = [f"sensor-{i:05d}" for i in range(streams)]
    xs = np.random.default_rng(0).normal(size=(16, streams, loaded.n_features))
    xs = xs.round(4).astype(np.float32)
    for step in range(WARM_STEPS):
        pool.step(ids, xs[step % 16])
    steps, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < seconds:
        pool.step(ids, xs[steps % 16])
        steps += 1
    return steps * streams / (time.perf_counter() - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description="The runtime's pool rate, as JSON on stdout.")
    parser.add_argument("model", type=Path)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    rate = measure(args.model, args.streams, args.seconds)
    print(json.dumps({"samples_per_s": rate, "streams": args.streams}))


if __name__ == "__main__":
    main()
