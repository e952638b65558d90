"""Cache-line-aligned float32 buffers for the kernels' parameters and scratch.

Why: the kernels stream every weight row through 32-byte vector loads. numpy only promises
16-byte alignment, and a packed parameter vector puts rows wherever the previous block ended,
so half the loads of a row could straddle two cache lines, and which half changed from one
process to the next with the allocator (measured: the same LSTM step varied by a third between
runs). Rows that start on a 64-byte line cost one line each, in every run.
"""

from __future__ import annotations

import numpy as np

LINE_BYTES = 64
LINE_FLOATS = LINE_BYTES // np.dtype(np.float32).itemsize


def align_up(n: int) -> int:
    """n rounded up to a whole number of cache lines of float32."""
    return -(-n // LINE_FLOATS) * LINE_FLOATS


def zeros(n: int) -> np.ndarray:
    """A float32 vector of n zeros whose first element starts a cache line."""
    raw = np.zeros(n + LINE_FLOATS, np.float32)
    start = (-raw.ctypes.data % LINE_BYTES) // raw.itemsize
    return raw[start : start + n]


def copy(values: np.ndarray) -> np.ndarray:
    """A cache-line-aligned float32 copy of a 1-D array."""
    out = zeros(values.size)
    out[:] = values
    return out
