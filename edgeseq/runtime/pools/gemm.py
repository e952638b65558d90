"""Large pool steps as matrix products: for a batch of streams, each layer's gates come from
BLAS GEMMs (weights read once for the whole batch: one [B, I + H] @ [I + H, 4H] for an LSTM,
separate x and h products where a GRU needs them apart) and one Numba pass for the gate
nonlinearities, which for an LSTM also reads and writes the state table in place. Where numpy's
OpenBLAS can be called from Numba (`blas.AVAILABLE`) and Numba has threads, an LSTM layer instead
runs as `lstm_shares.lstm_layer`: each thread stacks, multiplies and applies the gates for its own
share of the streams. Same program and state table as the kernels; the sums run in another order,
so results agree with one-stream-at-a-time stepping to float32 rounding rather than bit for bit.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from edgeseq import config
from edgeseq.runtime.kernels import program as ir
from edgeseq.runtime.planning.plan import Plan
from edgeseq.runtime.pools import blas
from edgeseq.runtime.pools.gate_rows import activate_rows, gru_cells, lstm_rows


def _lstm_in_shares() -> Any | None:
    """lstm_shares.lstm_layer where it can run (numpy's OpenBLAS callable, two threads or more;
    EDGESEQ_LSTM_SHARES=0 turns it off), else None."""
    if not blas.AVAILABLE or numba.get_num_threads() < 2 or not config.ENV.lstm_shares:
        return None
    from edgeseq.runtime.pools.lstm_shares import lstm_layer

    return lstm_layer


Rows = np.ndarray | slice  # the table rows of a batch: an index array, or a contiguous range


def _as_slice(rows: np.ndarray) -> slice | None:
    """rows as a slice when they are consecutive and increasing (the common case: a pool that
    steps the same streams every time), else None."""
    n = len(rows)
    if n == 0 or rows[-1] - rows[0] != n - 1:
        return None
    if n > 1 and not bool((np.diff(rows) == 1).all()):
        return None
    return slice(int(rows[0]), int(rows[0]) + n)


def _count(rows: Rows) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else len(rows)


class BatchRunner:
    """Runs a plan's program on a batch of streams with BLAS for the matrix products.

    Every intermediate lives in a buffer kept per batch size and is written with `out=`: fresh
    megabyte temporaries cost a page fault per 4 KiB on every call, more than the arithmetic.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.supported = not plan.uses(*ir.OWN_KERNEL_ONLY) and not any(
            isinstance(op, ir.Gru) and op.lbr == 0 for op in plan.ops
        )  # the *_ANY and int8 ops and GRU with linear_before_reset=0 run per stream
        self._buffers: dict[tuple[int, int, int], np.ndarray] = {}
        self.lstm_layer = _lstm_in_shares()  # None: numpy.matmul and one gate pass
        self.parts = 1 if self.lstm_layer is None else numba.get_num_threads()
        self.has_lstm = plan.uses(ir.Lstm)

    def _buf(self, slot: int, batch: int, width: int) -> np.ndarray:
        key = (slot, batch, width)
        if key not in self._buffers:
            self._buffers[key] = np.empty((batch, width), np.float32)
        return self._buffers[key]

    def _w(self, off: int, rows: int, cols: int) -> np.ndarray:
        return self.plan.params[off : off + rows * cols].reshape(rows, cols)

    def _gates(
        self,
        i: int,
        cur: np.ndarray,
        h: np.ndarray,
        w_x: np.ndarray,
        w_h: np.ndarray,
        bias: np.ndarray,
    ) -> np.ndarray:
        """cur @ w_x + h @ w_h + bias, into buffers of layer i."""
        g = np.matmul(cur, w_x, out=self._buf(3 * i, len(cur), w_x.shape[1]))
        g += np.matmul(h, w_h, out=self._buf(3 * i + 1, len(cur), w_h.shape[1]))
        g += bias
        return g

    def _gather(self, slot: int, table: np.ndarray, rows: Rows, off: int, width: int) -> np.ndarray:
        """table[rows, off:off+width] into a reused buffer (a plain copy when rows is a slice)."""
        out = self._buf(slot, _count(rows), width)
        if isinstance(rows, slice):
            np.copyto(out, table[rows, off : off + width])
            return out
        return np.take(table[:, off : off + width], rows, axis=0, out=out)

    def _stacked_input(self, i: int, cur: np.ndarray, table: np.ndarray, rows: Rows,
                       off_h: int, hid: int) -> np.ndarray:  # fmt: skip
        """[x, h] (B, I + H) for one layer: one GEMM against the stacked [W; R] weights."""
        n_in = cur.shape[1]
        xh = self._buf(3 * i + 2, len(cur), n_in + hid)
        xh[:, :n_in] = cur
        xh[:, n_in:] = table[rows, off_h : off_h + hid]
        return xh

    def _recurrent(
        self, i: int, op: ir.Recurrent, cur: np.ndarray, table: np.ndarray, rows: Rows,
        index: np.ndarray,
    ) -> np.ndarray:  # fmt: skip
        n_in, hid = op.n_in, op.hid
        p = self.plan.params
        batch = len(cur)
        if isinstance(op, ir.Lstm):
            if self.lstm_layer is not None:
                h = self._buf(3 * i + 1, batch, hid)
                self.lstm_layer(cur, self._w(op.off_wt, n_in + hid, 4 * hid),
                                p[op.off_b : op.off_b + 4 * hid], table, index, op.off_h,
                                op.off_c, self._buf(3 * i + 2, batch, n_in + hid),
                                self._buf(3 * i, batch, 4 * hid), h, self.parts)  # fmt: skip
                return h
            xh = self._stacked_input(i, cur, table, rows, op.off_h, hid)
            g = np.matmul(xh, self._w(op.off_wt, n_in + hid, 4 * hid),
                          out=self._buf(3 * i, batch, 4 * hid))  # fmt: skip
            h = self._buf(3 * i + 1, batch, hid)
            lstm_rows(g, p[op.off_b : op.off_b + 4 * hid], table, index, op.off_h, op.off_c, h)
            return h
        assert isinstance(op, ir.Gru | ir.Rnn)  # BatchRunner.supported: no *_ANY cells
        h = self._gather(3 * i + 2, table, rows, op.off_h, hid)
        if isinstance(op, ir.Gru):
            g3 = 3 * hid
            gx = np.matmul(cur, self._w(op.off_wx, n_in, g3), out=self._buf(3 * i, batch, g3))
            gx += p[op.off_wb : op.off_wb + g3]
            gh = np.matmul(h, self._w(op.off_rh, hid, g3), out=self._buf(3 * i + 1, batch, g3))
            gh += p[op.off_rb : op.off_rb + g3]
            gru_cells(gx, gh, h)
        else:
            wt = self._w(op.off_wt, n_in + hid, hid)
            g = self._gates(i, cur, h, wt[:n_in], wt[n_in:], p[op.off_b : op.off_b + hid])
            activate_rows(g, op.act, p[op.off_alpha])
            h[:] = g
        table[rows, op.off_h : op.off_h + hid] = h
        return h

    def step(self, xs: np.ndarray, table: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(B, F) samples for streams table[rows] -> (B, n_outputs); the table is updated."""
        if self.lstm_layer is not None and self.has_lstm:
            with blas.single_threaded():
                return self._step(xs, table, rows)
        return self._step(xs, table, rows)

    def _step(self, xs: np.ndarray, table: np.ndarray, rows: np.ndarray) -> np.ndarray:
        p, cur = self.plan.params, xs
        span = _as_slice(rows)  # a pool stepping the same streams in order: no fancy indexing
        for i, op in enumerate(self.plan.ops):
            out = self._buf(3 * i, len(xs), op.width)
            if isinstance(op, ir.Recurrent):
                cur = self._recurrent(i, op, cur, table, rows if span is None else span, rows)
            elif isinstance(op, ir.Dense):
                cur = np.matmul(cur, self._w(op.off_w, op.n_in, op.n_out), out=out)
                cur += p[op.off_b : op.off_b + op.n_out]
            elif isinstance(op, ir.Affine):
                cur = np.multiply(cur, p[op.off_scale : op.off_scale + op.n], out=out)
                cur += p[op.off_shift : op.off_shift + op.n]
            elif isinstance(op, ir.Act):
                out[:] = cur
                activate_rows(out, op.kind, p[op.off_alpha])
                cur = out
            else:  # softmax
                e = np.exp(cur - cur.max(axis=1, keepdims=True))
                cur = e / e.sum(axis=1, keepdims=True)
        return np.array(cur, np.float32)
