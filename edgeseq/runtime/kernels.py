"""Numba kernels: one call advances a whole model by one sample (or a block, or a batch).

A model is a small *program*: rows of `code` (int64, width CODE_WIDTH) naming an operation and
offsets into one flat float32 `params` array; a stream's state (every layer's h, and c for
LSTM) is one flat float32 vector. One njit call per sample, with six arrays, keeps Python's
per-call overhead to a minimum; the loops are written so that LLVM vectorises the gate
updates (weights are stored transposed, [inputs + hidden, gates * hidden], so each input element
adds a contiguous row to all gates at once) and tanh/sigmoid are polynomials, not libm calls.

Gate orders are ONNX's (plan.py converts): LSTM i, o, f, c; GRU z, r, h.
Kernels are pure and allocate nothing: scratch and outputs are passed in. They compile with
fastmath (reassociation lets LLVM vectorise the reductions) and the NumPy error model (Python's
model checks every float division for zero, and that branch alone stops vectorisation).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from edgeseq.runtime.fastmath import FASTMATH, inline_kernel, sigmoid, tanh

CODE_WIDTH = 10
OP_AFFINE, OP_RNN, OP_LSTM, OP_GRU, OP_DENSE, OP_ACT, OP_SOFTMAX = range(7)
ACT_RELU, ACT_TANH, ACT_SIGMOID, ACT_LEAKY_RELU, ACT_IDENTITY = range(5)
ONE = np.float32(1.0)
ZERO = np.float32(0.0)


@inline_kernel
def _matvec_into(out, params, off_wt, n_in, n_out, v):
    """out[:n_out] += v[:n_in] @ W, W stored row-major (n_in, n_out) at params[off_wt:].

    Four input rows per pass over `out` (one load and store of the sums per four FMAs, not
    per one), and every access through a slice indexed from 0: signed offset arithmetic inside
    the loop would make Numba emit negative-index wraparound checks and LLVM give up vectorising.
    """
    acc = out[:n_out]
    k = 0
    while k + 4 <= n_in:
        v0, v1, v2, v3 = v[k], v[k + 1], v[k + 2], v[k + 3]
        base = off_wt + k * n_out
        w0 = params[base : base + n_out]
        w1 = params[base + n_out : base + 2 * n_out]
        w2 = params[base + 2 * n_out : base + 3 * n_out]
        w3 = params[base + 3 * n_out : base + 4 * n_out]
        for j in range(n_out):
            acc[j] += w0[j] * v0 + w1[j] * v1 + w2[j] * v2 + w3[j] * v3
        k += 4
    while k < n_in:
        vk = v[k]
        w = params[off_wt + k * n_out : off_wt + (k + 1) * n_out]
        for j in range(n_out):
            acc[j] += w[j] * vk
        k += 1


@inline_kernel
def _copy(dst, src, n):
    for j in range(n):
        dst[j] = src[j]


@inline_kernel
def _activate(kind, alpha, v):
    if kind == ACT_TANH:
        return tanh(v)
    if kind == ACT_SIGMOID:
        return sigmoid(v)
    if kind == ACT_RELU:
        return max(v, ZERO)
    if kind == ACT_LEAKY_RELU:
        return v if v >= ZERO else alpha * v
    return v


@inline_kernel
def _rnn(row, params, cur, nxt, state, gates):
    """h = f(W x + R h + Wb + Rb); row: I, H, off_wt (I+H, H), off_b, off_h, act, off_alpha."""
    n_in, hid, off_wt, off_b, off_h, act = row[1], row[2], row[3], row[4], row[5], row[6]
    alpha = params[row[7]]
    h = state[off_h : off_h + hid]
    _copy(gates, params[off_b : off_b + hid], hid)
    _matvec_into(gates, params, off_wt, n_in, hid, cur)
    _matvec_into(gates, params, off_wt + n_in * hid, hid, hid, h)
    for j in range(hid):
        h[j] = _activate(act, alpha, gates[j])
    _copy(nxt, h, hid)
    return hid


@inline_kernel
def _lstm(row, params, cur, nxt, state, gates):
    """ONNX LSTM step, gates i, o, f, c; row: I, H, off_wt (I+H, 4H), off_b (4H), off_h, off_c."""
    n_in, hid, off_wt, off_b, off_h, off_c = row[1], row[2], row[3], row[4], row[5], row[6]
    g4 = 4 * hid
    h = state[off_h : off_h + hid]
    c = state[off_c : off_c + hid]
    _copy(gates, params[off_b : off_b + g4], g4)
    _matvec_into(gates, params, off_wt, n_in, g4, cur)
    _matvec_into(gates, params, off_wt + n_in * g4, hid, g4, h)
    gi, go = gates[:hid], gates[hid : 2 * hid]
    gf, gc = gates[2 * hid : 3 * hid], gates[3 * hid : g4]
    for j in range(hid):
        c[j] = sigmoid(gf[j]) * c[j] + sigmoid(gi[j]) * tanh(gc[j])
        h[j] = sigmoid(go[j]) * tanh(c[j])
    _copy(nxt, h, hid)
    return hid


@inline_kernel
def _gru(row, params, cur, nxt, state, gates):
    """ONNX GRU step, gates z, r, h; row: I, H, off_wx (I, 3H), off_rh (H, 3H), off_wb, off_rb,
    off_h, linear_before_reset."""
    n_in, hid, off_wx, off_rh, off_wb, off_rb = row[1], row[2], row[3], row[4], row[5], row[6]
    off_h, lbr = row[7], row[8]
    g3 = 3 * hid
    h = state[off_h : off_h + hid]
    gx, gh, rh = gates[:g3], gates[g3 : 2 * g3], gates[2 * g3 : 2 * g3 + hid]
    _copy(gx, params[off_wb : off_wb + g3], g3)
    _copy(gh, params[off_rb : off_rb + g3], g3)
    _matvec_into(gx, params, off_wx, n_in, g3, cur)
    if lbr:
        _matvec_into(gh, params, off_rh, hid, g3, h)
    else:  # linear_before_reset=0 needs r before the candidate's R term: z, r columns first
        for k in range(hid):
            w = params[off_rh + k * g3 : off_rh + k * g3 + 2 * hid]
            for j in range(2 * hid):
                gh[j] += w[j] * h[k]
    z, r = gx[:hid], gx[hid : 2 * hid]
    for j in range(hid):
        z[j] = sigmoid(z[j] + gh[j])
        r[j] = sigmoid(r[j] + gh[hid + j])
        rh[j] = r[j] * h[j]
    cand = gh[2 * hid : g3]
    if not lbr:  # R_h (r * h) + Rb_h
        for k in range(hid):
            w = params[off_rh + k * g3 + 2 * hid : off_rh + (k + 1) * g3]
            for j in range(hid):
                cand[j] += w[j] * rh[k]
    xh = gx[2 * hid : g3]
    for j in range(hid):
        n = tanh(xh[j] + r[j] * cand[j]) if lbr else tanh(xh[j] + cand[j])
        h[j] = (ONE - z[j]) * n + z[j] * h[j]
    _copy(nxt, h, hid)
    return hid


@inline_kernel
def _elementwise(row, params, cur, nxt):
    op, n = row[0], row[1]
    if op == OP_AFFINE:  # v * scale + shift
        scale, shift = params[row[2] : row[2] + n], params[row[3] : row[3] + n]
        for j in range(n):
            nxt[j] = cur[j] * scale[j] + shift[j]
    elif op == OP_ACT:
        alpha = params[row[3]]
        for j in range(n):
            nxt[j] = _activate(row[2], alpha, cur[j])
    else:  # softmax
        peak = cur[0]
        for j in range(n):
            peak = max(peak, cur[j])
        total = ZERO
        for j in range(n):
            nxt[j] = np.exp(cur[j] - peak)
            total += nxt[j]
        for j in range(n):
            nxt[j] /= total
    return n


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
        row = code[i]
        op = row[0]
        if op == OP_RNN:
            n = _rnn(row, params, cur, nxt, state, gates)
        elif op == OP_LSTM:
            n = _lstm(row, params, cur, nxt, state, gates)
        elif op == OP_GRU:
            n = _gru(row, params, cur, nxt, state, gates)
        elif op == OP_DENSE:
            n = row[2]
            _copy(nxt, params[row[4] : row[4] + n], n)
            _matvec_into(nxt, params, row[3], row[1], n, cur)
        else:
            n = _elementwise(row, params, cur, nxt)
        cur, nxt = nxt, cur
    for j in range(out.shape[0]):
        out[j] = cur[j]


@njit(cache=True, inline="always")
def first_bad(x):
    """Index of the first NaN or infinity in a flat array, or -1."""
    for j in range(x.shape[0]):
        if not np.isfinite(x[j]):
            return j
    return -1


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
