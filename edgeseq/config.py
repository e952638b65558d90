"""Every setting edgeseq reads from its environment, and every tuning constant, in one place.

The environment is read once, when this module is first imported, into `ENV`; code reads
`config.ENV.<field>` when it needs a value (so a test may swap `ENV` for a changed copy with
`dataclasses.replace`). Nothing else in the package reads an `EDGESEQ_*` variable.

Environment variables (default in brackets):

- `EDGESEQ_SPECIALIZE` [1]: 0 makes streams and pools run the generic interpreter kernel
  instead of each model's own (the same cells; results agree to float32 rounding).
- `EDGESEQ_LSTM_SHARES` [1]: 0 keeps numpy's matrix products and one gate pass for large LSTM
  pool steps, instead of per-thread shares calling OpenBLAS from inside the kernel.
- `EDGESEQ_KERNEL_DIR`: where generated per-model kernel sources are written; unset, beside
  Numba's cache (`$NUMBA_CACHE_DIR/edgeseq-kernels`) when `NUMBA_CACHE_DIR` is set, else
  `$XDG_CACHE_HOME/edgeseq/kernels` (`~/.cache/edgeseq/kernels`).
- `EDGESEQ_DEVICES_DIR` [the checkout's `devices/`]: board profiles for `edgeseq devices` and
  `edgeseq bundle`.
- `EDGESEQ_SERVE_AFRESH`: internal, never set by hand: a daemon that compiled its kernels at
  start sets it for the process that replaces it.

Tuning constants (measured on the 2-core development machine; BENCHMARKS.md has the figures):

- `PARALLEL_BATCH` [256]: streams per pool step from which the interpreter kernel runs on
  every thread (below, one thread beats the fork/join cost);
- `PARALLEL_ROWS` [32]: the same for a model's own kernel, which is faster per stream;
- `GEMM_BATCH` [128]: streams per pool step from which BLAS matrix products over the batch
  replace per-stream kernels, for weights over `CACHED_BYTES`;
- `GEMM_BATCH_CACHED` [512]: the same for weights that fit a core's L2 cache;
- `CACHED_BYTES` [256 KiB]: weights up to this size count as cached (half of Zen 3's or a
  Cortex-A72's L2);
- `COMPILE_QUIET_AFTER` [5 s]: a compile that starts this long after the last one ended is a
  new burst, with a notice of its own;
- `HOLT_WINTERS_MAX_ROWS` [20,000]: longer series get no Holt-Winters baseline (fitting them
  takes too long, and they need no such help).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PARALLEL_BATCH = 256
PARALLEL_ROWS = 32
# Measured here, 2 cores: bench-lstm (205 KB) with 64 streams, 470k samples/s per stream with
# BLAS against 250k with the own kernel on every core; with 1,024, 480k against 600k. A 455 KB
# LSTM with 1,024: 4.8 ms per stream against 3.8 ms.
GEMM_BATCH, GEMM_BATCH_CACHED, CACHED_BYTES = 128, 512, 256 * 1024
COMPILE_QUIET_AFTER = 5.0
HOLT_WINTERS_MAX_ROWS = 20_000

SERVE_AFRESH = "EDGESEQ_SERVE_AFRESH"  # the variable's name: the daemon sets and clears it


@dataclass(frozen=True)
class Environment:
    """What the variables of the table above said when edgeseq was imported."""

    specialize: bool
    lstm_shares: bool
    kernel_dir: Path  # resolved: EDGESEQ_KERNEL_DIR, NUMBA_CACHE_DIR or XDG_CACHE_HOME
    devices_dir: Path | None  # None: the checkout's devices/
    serve_afresh: bool

    @classmethod
    def read(cls, environ: Mapping[str, str]) -> Environment:
        return cls(
            specialize=environ.get("EDGESEQ_SPECIALIZE", "1") != "0",
            lstm_shares=environ.get("EDGESEQ_LSTM_SHARES", "1") != "0",
            kernel_dir=kernel_dir(environ),
            devices_dir=Path(environ["EDGESEQ_DEVICES_DIR"])
            if environ.get("EDGESEQ_DEVICES_DIR")
            else None,
            serve_afresh=bool(environ.get(SERVE_AFRESH)),
        )


def kernel_dir(environ: Mapping[str, str]) -> Path:
    """Where generated kernels live: $EDGESEQ_KERNEL_DIR, else beside Numba's cache when
    NUMBA_CACHE_DIR is set (a service's cache directory), else the user's cache folder."""
    if environ.get("EDGESEQ_KERNEL_DIR"):
        return Path(environ["EDGESEQ_KERNEL_DIR"])
    if environ.get("NUMBA_CACHE_DIR"):
        return Path(environ["NUMBA_CACHE_DIR"]) / "edgeseq-kernels"
    base = environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgeseq" / "kernels"


ENV = Environment.read(os.environ)
