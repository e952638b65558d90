"""Numba kernels that interpret a plan: one call advances a whole model by one sample (or a
block, or a batch of streams).

A model is a small *program*: rows of `code` (int64, width CODE_WIDTH; program.py lays them
out) naming an operation and offsets into one flat float32 `params` array; a stream's state
(every layer's h, and c for LSTM) is one flat float32 vector. These kernels read the program at
run time, so one compiled kernel serves every model (pools, plan verification, and streams
before their own kernel is compiled). The per-model kernels of specialize.py run the same cells
with the sizes fixed.

Kernels are pure and allocate nothing: scratch and outputs are passed in. They compile with
fastmath (reassociation lets LLVM vectorise the reductions) and the NumPy error model (Python's
model checks every float division for zero, and that branch alone stops vectorisation).
"""

from __future__ import annotations

from numba import njit, prange

from edgeseq.runtime.kernels import cells
from edgeseq.runtime.kernels.fastmath import FASTMATH, inline_kernel
from edgeseq.runtime.kernels.program import OP_ACT, OP_AFFINE, OP_DENSE, OP_GRU, OP_LSTM, OP_RNN

_activate = cells.activate
first_bad = cells.first_bad


@inline_kernel
def _apply(row, p, cur, nxt, state, gates):
    """One code row: cur -> nxt (and the state); returns the width of nxt. A row holds its
    op's fields in its cell's argument order (program.py), so they pass straight through. The
    *_ANY cells are not here: only the per-model kernels run them."""
    op = row[0]
    if op == OP_LSTM:
        cells.lstm(p, cur, nxt, state, gates, row[1], row[2], row[3], row[4], row[5], row[6])
        return row[2]
    if op == OP_GRU:
        cells.gru(p, cur, nxt, state, gates, row[1], row[2], row[3], row[4], row[5], row[6],
                  row[7], row[8])  # fmt: skip
        return row[2]
    if op == OP_RNN:
        cells.rnn(p, cur, nxt, state, gates, row[1], row[2], row[3], row[4], row[5], row[6],
                  row[7])  # fmt: skip
        return row[2]
    if op == OP_DENSE:
        cells.dense(p, cur, nxt, row[1], row[2], row[3], row[4])
        return row[2]
    if op == OP_AFFINE:
        cells.affine(p, cur, nxt, row[1], row[2], row[3])
    elif op == OP_ACT:
        cells.act(p, cur, nxt, row[1], row[2], row[3])
    else:
        cells.softmax(cur, nxt, row[1])
    return row[1]


@inline_kernel
def _advance(code, params, x, state, scratch, out):
    """Advance one stream by one sample: x (F,) -> out (n_out,); state updated in place.

    scratch: (3, width) float32; rows 0/1 ping-pong activations, row 2 holds gate sums.
    """
    cur, nxt, gates = scratch[0], scratch[1], scratch[2]
    n = x.shape[0]
    for j in range(n):
        cur[j] = x[j]
    for i in range(code.shape[0]):
        n = _apply(code[i], params, cur, nxt, state, gates)
        cur, nxt = nxt, cur
    for j in range(out.shape[0]):
        out[j] = cur[j]


@njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def step(code, params, x, state, scratch, out):
    """Advance one stream by one sample, unless x holds a NaN or infinity: then nothing changes
    and the index of the bad value is returned (else -1). Checking here costs nothing; NumPy's
    isfinite().all() from Python costs more than the whole step."""
    bad = first_bad(x)
    if bad < 0:
        _advance(code, params, x, state, scratch, out)
    return bad


@njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def feed(code, params, xs, state, scratch, ys):
    """Advance one stream through a block of samples: xs (T, F) -> ys (T, n_out). A NaN or
    infinity anywhere leaves the state untouched; returns its flat index (else -1)."""
    bad = first_bad(xs.ravel())
    if bad < 0:
        for t in range(xs.shape[0]):
            _advance(code, params, xs[t], state, scratch, ys[t])
    return bad


@njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def step_rows(code, params, xs, table, rows, scratch, ys):
    """Advance many streams by one sample each: stream b owns table[rows[b]]; xs (B, F).
    Returns the flat index of a NaN or infinity in xs (nothing advanced), else -1."""
    bad = first_bad(xs.ravel())
    if bad < 0:
        for b in range(xs.shape[0]):
            _advance(code, params, xs[b], table[rows[b]], scratch[0], ys[b])
    return bad


@njit(cache=True, nogil=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def step_rows_parallel(code, params, xs, table, rows, scratch, ys):
    """step_rows spread over threads; scratch (threads, 3, width), one slice per thread."""
    bad = first_bad(xs.ravel())
    if bad >= 0:
        return bad
    n_chunks = scratch.shape[0]
    batch = xs.shape[0]
    for c in prange(n_chunks):
        for b in range(c, batch, n_chunks):
            _advance(code, params, xs[b], table[rows[b]], scratch[c], ys[b])
    return -1
