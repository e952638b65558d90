"""An LSTM layer of a large pool step, one share of the streams per thread.

Each of Numba's threads takes a contiguous share of the batch and does, for its streams only, what
`gemm.BatchRunner` otherwise does in three passes for all of them: stack [x, h], one
single-threaded `sgemm` against the stacked [W; R] weights, then the gate pass that reads and
writes the state table. Every stage runs on every core and a share's gate sums are still in cache
when its gate pass reads them. Only imported where `blas.AVAILABLE` (the kernels call numpy's
OpenBLAS by symbol), and only run inside `blas.single_threaded()`, so that OpenBLAS does not start
threads of its own under Numba's.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from edgeseq.runtime.kernels.fastmath import FASTMATH
from edgeseq.runtime.pools import blas
from edgeseq.runtime.pools.gate_rows import lstm_rows

if not blas.AVAILABLE:  # pragma: no cover - guarded by the one importer, gemm.BatchRunner
    raise ImportError("edgeseq.runtime.pools.lstm_shares needs numpy's ILP64 OpenBLAS")

sgemm, ROW_MAJOR, NO_TRANS = blas.sgemm, blas.ROW_MAJOR, blas.NO_TRANS
ONE, ZERO = np.float32(1.0), np.float32(0.0)


@njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def _stack(
    cur: np.ndarray, table: np.ndarray, rows: np.ndarray, off_h: int, xh: np.ndarray, lo: int,
    hi: int,
) -> None:  # fmt: skip
    """xh[b] = [cur[b], h of stream b] for b in lo..hi: the GEMM's left operand."""
    n_in = cur.shape[1]
    hid = xh.shape[1] - n_in
    for b in range(lo, hi):
        x, row, dst = cur[b], table[rows[b]], xh[b]
        for j in range(n_in):
            dst[j] = x[j]
        for j in range(hid):
            dst[n_in + j] = row[off_h + j]


@njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def _share(
    cur: np.ndarray, weights: np.ndarray, bias: np.ndarray, table: np.ndarray, rows: np.ndarray,
    off_h: int, off_c: int, xh: np.ndarray, gates: np.ndarray, h_out: np.ndarray, lo: int,
    hi: int,
) -> None:  # fmt: skip
    """One thread's share, streams lo..hi: stack, sgemm, gates (a plain function, not a parfor
    body, so that its loops vectorise as in a serial kernel)."""
    _stack(cur, table, rows, off_h, xh, lo, hi)
    sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, hi - lo, weights.shape[1], weights.shape[0], ONE,
          xh[lo:].ctypes, xh.shape[1], weights.ctypes, weights.shape[1], ZERO,
          gates[lo:].ctypes, gates.shape[1])  # fmt: skip
    lstm_rows(gates[lo:hi], bias, table, rows[lo:hi], off_h, off_c, h_out[lo:hi])


@njit(cache=True, nogil=True, parallel=True)
def lstm_layer(
    cur: np.ndarray, weights: np.ndarray, bias: np.ndarray, table: np.ndarray, rows: np.ndarray,
    off_h: int, off_c: int, xh: np.ndarray, gates: np.ndarray, h_out: np.ndarray, parts: int,
) -> None:  # fmt: skip
    """One LSTM layer for streams table[rows]: cur (B, I) in, h_out (B, H) out, c and h updated
    in the table. weights (I + H, 4H) and the buffers xh (B, I + H), gates (B, 4H) are
    C-contiguous (checked: sgemm would read past them or leave gates unwritten); `parts` shares,
    one per thread."""
    n, hid = cur.shape[0], h_out.shape[1]
    if (
        weights.shape[0] != xh.shape[1] or xh.shape[1] != cur.shape[1] + hid
        or weights.shape[1] != 4 * hid or gates.shape[1] != 4 * hid or bias.shape[0] != 4 * hid
        or min(xh.shape[0], gates.shape[0], h_out.shape[0], rows.shape[0]) < n
        or not (weights.flags.c_contiguous and xh.flags.c_contiguous
                and gates.flags.c_contiguous)
    ):  # fmt: skip
        raise ValueError("lstm_layer: operands of disagreeing shapes, or not C-contiguous")
    size = (n + parts - 1) // parts
    for part in prange(parts):
        lo = part * size
        hi = min(n, lo + size)
        if hi > lo:
            _share(cur, weights, bias, table, rows, off_h, off_c, xh, gates, h_out, lo, hi)
