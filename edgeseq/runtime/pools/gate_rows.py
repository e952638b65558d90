"""The elementwise half of a BLAS pool step: the gate nonlinearities over many streams' rows,
once the matrix products have summed their gates (gemm.py, and lstm_shares.py per thread).
An LSTM's pass also reads and writes the pool's state table in place."""

from __future__ import annotations

import numpy as np
from numba import njit

from edgeseq.runtime.kernels import cells
from edgeseq.runtime.kernels.fastmath import FASTMATH, sigmoid, tanh


@njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def lstm_rows(
    gates: np.ndarray, bias: np.ndarray, table: np.ndarray, rows: np.ndarray, off_h: int,
    off_c: int, h_out: np.ndarray,
) -> None:  # fmt: skip
    """The LSTM cell for a batch, reading and writing the state table directly.

    gates (B, 4H): [x, h] @ [W; R] for each stream, bias not yet added (ONNX order i, o, f,
    c); stream b's c and h live in table[rows[b]] at off_c and off_h; the new h is also written
    to h_out (B, H), the next layer's input. One pass instead of separate bias, gather and
    scatter passes over megabytes of batch."""
    hid = h_out.shape[1]
    bi, bo, bf, bc = bias[:hid], bias[hid : 2 * hid], bias[2 * hid : 3 * hid], bias[3 * hid :]
    for b in range(gates.shape[0]):
        g, row, ho = gates[b], table[rows[b]], h_out[b]
        gi, go, gf, gc = g[:hid], g[hid : 2 * hid], g[2 * hid : 3 * hid], g[3 * hid : 4 * hid]
        c, h = row[off_c : off_c + hid], row[off_h : off_h + hid]
        for j in range(hid):
            cj = sigmoid(gf[j] + bf[j]) * c[j] + sigmoid(gi[j] + bi[j]) * tanh(gc[j] + bc[j])
            c[j] = cj
            hj = sigmoid(go[j] + bo[j]) * tanh(cj)
            h[j] = hj
            ho[j] = hj


@njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def gru_cells(gx: np.ndarray, gh: np.ndarray, h: np.ndarray) -> None:
    """In place: h (B, H) from x- and h-side gate sums (B, 3H), z r h, linear_before_reset=1."""
    hid = h.shape[1]
    for b in range(h.shape[0]):
        x_, r_, hb = gx[b], gh[b], h[b]
        for j in range(hid):
            z = sigmoid(x_[j] + r_[j])
            r = sigmoid(x_[hid + j] + r_[hid + j])
            n = tanh(x_[2 * hid + j] + r * r_[2 * hid + j])
            hb[j] = (1.0 - z) * n + z * hb[j]


@njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def activate_rows(v: np.ndarray, kind: int, alpha: float) -> None:
    for b in range(v.shape[0]):
        row = v[b]
        for j in range(row.shape[0]):
            row[j] = cells.activate(kind, alpha, row[j])
