"""Numba kernels: one call advances a whole model by one sample (or a block, or a batch).

A model is a small *program*: rows of `code` (int64, width CODE_WIDTH) naming an operation and
offsets into one flat float32 `params` array; a stream's state (every layer's h, and c for
LSTM) is one flat float32 vector. One njit call per sample, with six arrays, keeps Python's
per-call overhead to a minimum; the loops are written so that LLVM vectorises the gate
updates (weights are stored transposed, [inputs + hidden, gates * hidden], so each input element
adds a contiguous row to all gates at once) and tanh/sigmoid are polynomials, not libm calls.

Gate orders are ONNX's (plan.py converts): LSTM i, o, f, c; GRU z, r, h.
Kernels are pure and allocate nothing: scratch and outputs are passed in.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from edgeseq.runtime.fastmath import sigmoid, tanh

CODE_WIDTH = 10
OP_AFFINE, OP_RNN, OP_LSTM, OP_GRU, OP_DENSE, OP_ACT, OP_SOFTMAX = range(7)
ACT_RELU, ACT_TANH, ACT_SIGMOID, ACT_LEAKY_RELU, ACT_IDENTITY = range(5)
ONE = np.float32(1.0)
ZERO = np.float32(0.0)


@njit(cache=True, inline="always")
def _matvec_into(out, params, off_wt, n_in, n_out, v, accumulate):
    """out[:n_out] (+)= v[:n_in] @ W, with W stored row-major (n_in, n_out) at off_wt."""
    if not accumulate:
        for j in range(n_out):
            out[j] = ZERO
    for k in range(n_in):
        vk = v[k]
        row = off_wt + k * n_out
        for j in range(n_out):
            out[j] += params[row + j] * vk


@njit(cache=True, inline="always")
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


@njit(cache=True, inline="always")
def _rnn(row, params, cur, nxt, state, gates):
    """h = f(W x + R h + Wb + Rb); row: I, H, off_wt (I+H, H), off_b, off_h, act, alpha."""
    n_in, hid, off_wt, off_b, off_h, act = row[1], row[2], row[3], row[4], row[5], row[6]
    alpha = params[row[7]]
    for j in range(hid):
        gates[j] = params[off_b + j]
    _matvec_into(gates, params, off_wt, n_in, hid, cur, True)
    _matvec_into(gates, params, off_wt + n_in * hid, hid, hid, state[off_h:], True)
    for j in range(hid):
        h = _activate(act, alpha, gates[j])
        state[off_h + j] = h
        nxt[j] = h
    return hid


@njit(cache=True, inline="always")
def _lstm(row, params, cur, nxt, state, gates):
    """ONNX LSTM step, gates i, o, f, c; row: I, H, off_wt (I+H, 4H), off_b (4H), off_h, off_c."""
    n_in, hid, off_wt, off_b, off_h, off_c = row[1], row[2], row[3], row[4], row[5], row[6]
    g4 = 4 * hid
    for j in range(g4):
        gates[j] = params[off_b + j]
    _matvec_into(gates, params, off_wt, n_in, g4, cur, True)
    _matvec_into(gates, params, off_wt + n_in * g4, hid, g4, state[off_h:], True)
    for j in range(hid):
        i = sigmoid(gates[j])
        o = sigmoid(gates[hid + j])
        f = sigmoid(gates[2 * hid + j])
        c = f * state[off_c + j] + i * tanh(gates[3 * hid + j])
        state[off_c + j] = c
        h = o * tanh(c)
        state[off_h + j] = h
        nxt[j] = h
    return hid


@njit(cache=True, inline="always")
def _gru(row, params, cur, nxt, state, gates):
    """ONNX GRU step, gates z, r, h; row: I, H, off_wx (I, 3H), off_rh (H, 3H), off_wb, off_rb,
    off_h, linear_before_reset."""
    n_in, hid, off_wx, off_rh, off_wb, off_rb = row[1], row[2], row[3], row[4], row[5], row[6]
    off_h, lbr = row[7], row[8]
    g3 = 3 * hid
    gx, gh = gates[:g3], gates[g3 : 2 * g3]
    for j in range(g3):
        gx[j] = params[off_wb + j]
        gh[j] = params[off_rb + j]
    _matvec_into(gx, params, off_wx, n_in, g3, cur, True)
    h_prev = state[off_h : off_h + hid]
    if lbr:
        _matvec_into(gh, params, off_rh, hid, g3, h_prev, True)
    else:  # z and r first; the candidate needs R_h (r * h) afterwards
        _matvec_into(gh, params, off_rh, hid, 2 * hid, h_prev, True)
    rh = gates[2 * g3 : 2 * g3 + hid]
    for j in range(hid):
        gx[j] = sigmoid(gx[j] + gh[j])  # z
        gx[hid + j] = sigmoid(gx[hid + j] + gh[hid + j])  # r
        rh[j] = gx[hid + j] * h_prev[j]
    if not lbr:
        cand = gh[2 * hid : g3]
        for j in range(hid):
            cand[j] = params[off_rb + 2 * hid + j]
        for k in range(hid):
            row_k = off_rh + k * g3 + 2 * hid
            for j in range(hid):
                cand[j] += params[row_k + j] * rh[k]
    for j in range(hid):
        if lbr:
            n = tanh(gx[2 * hid + j] + gx[hid + j] * gh[2 * hid + j])
        else:
            n = tanh(gx[2 * hid + j] + gh[2 * hid + j])
        z = gx[j]
        h = (ONE - z) * n + z * h_prev[j]
        nxt[j] = h
    for j in range(hid):
        state[off_h + j] = nxt[j]
    return hid


@njit(cache=True, inline="always")
def _elementwise(row, params, cur, nxt):
    op, n = row[0], row[1]
    if op == OP_AFFINE:  # v * scale + shift
        for j in range(n):
            nxt[j] = cur[j] * params[row[2] + j] + params[row[3] + j]
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


@njit(cache=True, nogil=True)
def step(code, params, x, state, scratch, out):
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
            for j in range(n):
                nxt[j] = params[row[4] + j]
            _matvec_into(nxt, params, row[3], row[1], n, cur, True)
        else:
            n = _elementwise(row, params, cur, nxt)
        cur, nxt = nxt, cur
    for j in range(out.shape[0]):
        out[j] = cur[j]


@njit(cache=True, nogil=True)
def feed(code, params, xs, state, scratch, ys):
    """Advance one stream through a block of samples: xs (T, F) -> ys (T, n_out)."""
    for t in range(xs.shape[0]):
        step(code, params, xs[t], state, scratch, ys[t])


@njit(cache=True, nogil=True, parallel=True)
def step_many(code, params, xs, states, rows, scratch, ys):
    """Advance many streams by one sample each: stream b owns states[rows[b]].

    xs (B, F), ys (B, n_out); scratch (threads, 3, width), one slice per worker chunk.
    """
    n_chunks = scratch.shape[0]
    batch = xs.shape[0]
    for c in prange(n_chunks):
        for b in range(c, batch, n_chunks):
            step(code, params, xs[b], states[rows[b]], scratch[c], ys[b])
