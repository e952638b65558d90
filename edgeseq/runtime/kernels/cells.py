"""The per-layer steps the kernels are built from: one recurrent cell, dense or elementwise op
advancing one sample. Every size and offset is an explicit argument.

Two drivers call them: the generic interpreter in interpreter.py (sizes read from a plan's `code`
rows at run time, one compiled kernel for every model) and the per-model kernels that
specialize.py generates (sizes written into the source as literals, so LLVM sees constant trip
counts and unrolls and vectorises for the exact shapes). Both inline these functions, so the
arithmetic, and therefore every result, is the same.

All of them are pure and allocate nothing: `p` is the flat float32 parameter array, `x` the
layer's input, `y` its output, `state` the stream's flat state vector (updated in place) and
`gates` scratch. Weights are stored transposed, [inputs + hidden, gates * hidden], so each input
element adds a contiguous row to all gates at once; tanh/sigmoid are polynomials, not libm calls.
Gate orders are ONNX's (plan.py converts): LSTM i, o, f, c; GRU z, r, h.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from edgeseq.runtime.kernels.fastmath import FASTMATH, inline_kernel, sigmoid, tanh

ACT_RELU, ACT_TANH, ACT_SIGMOID, ACT_LEAKY_RELU, ACT_IDENTITY = range(5)
# The rest of the functions the ONNX RNN operators name (the *_any cells take them all).
ACT_AFFINE, ACT_THRESHOLDED_RELU, ACT_SCALED_TANH, ACT_HARD_SIGMOID = range(5, 9)
ACT_ELU, ACT_SOFTSIGN, ACT_SOFTPLUS = range(9, 12)
ONE = np.float32(1.0)
ZERO = np.float32(0.0)
FLOAT32_MAX = np.float32(np.finfo(np.float32).max)


@inline_kernel
def matvec_into(acc, p, off_wt, n_in, n_out, v):
    """acc[:n_out] += v[:n_in] @ W, W stored row-major (n_in, n_out) at p[off_wt:]. p is the
    float32 parameters, or their int8 view for the int8 cells (then off_wt counts bytes): each
    weight becomes float32 as it is read (a no-op for float32; LLVM widens and converts int8
    a vector at a time), and Numba compiles the function once for each.

    Four input rows per pass over `acc` (one load and store of the sums per four FMAs, not
    per one), and every access through a slice indexed from 0: signed offset arithmetic inside
    the loop would make Numba emit negative-index wraparound checks and LLVM give up vectorising.
    """
    acc = acc[:n_out]
    k = 0
    while k + 4 <= n_in:
        v0, v1, v2, v3 = v[k], v[k + 1], v[k + 2], v[k + 3]
        base = off_wt + k * n_out
        w0 = p[base : base + n_out]
        w1 = p[base + n_out : base + 2 * n_out]
        w2 = p[base + 2 * n_out : base + 3 * n_out]
        w3 = p[base + 3 * n_out : base + 4 * n_out]
        for j in range(n_out):
            acc[j] += (np.float32(w0[j]) * v0 + np.float32(w1[j]) * v1
                       + np.float32(w2[j]) * v2 + np.float32(w3[j]) * v3)  # fmt: skip
        k += 4
    while k < n_in:
        vk = v[k]
        w = p[off_wt + k * n_out : off_wt + (k + 1) * n_out]
        for j in range(n_out):
            acc[j] += np.float32(w[j]) * vk
        k += 1


@inline_kernel
def copy(dst, src, n):
    for j in range(n):
        dst[j] = src[j]


@inline_kernel
def activate(kind, alpha, v):
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
def stacked_sums(p, x, h, gates, n_in, hid, width, off_wt, off_b):
    """gates[:width] = b + [x, h] @ [W; R], the stacked weights (I + H, width) at off_wt."""
    copy(gates, p[off_b : off_b + width], width)
    matvec_into(gates, p, off_wt, n_in, width, x)
    matvec_into(gates, p, off_wt + n_in * width, hid, width, h)


@inline_kernel
def gru_sums(p, x, h, gx, gh, n_in, hid, off_wx, off_rh, off_wb, off_rb, lbr):
    """gx = W x + Wb for z, r, h; gh = R h + Rb for z and r, and for h when lbr (else gh's h
    part holds Rb_h, and reset_sums adds R_h (r * h) once r is known)."""
    g3 = 3 * hid
    copy(gx, p[off_wb : off_wb + g3], g3)
    copy(gh, p[off_rb : off_rb + g3], g3)
    matvec_into(gx, p, off_wx, n_in, g3, x)
    if lbr:
        matvec_into(gh, p, off_rh, hid, g3, h)
    else:  # z, r columns first; the candidate's needs r
        for k in range(hid):
            w = p[off_rh + k * g3 : off_rh + k * g3 + 2 * hid]
            for j in range(2 * hid):
                gh[j] += w[j] * h[k]


@inline_kernel
def reset_sums(p, cand, rh, hid, off_rh):
    """cand += R_h (r * h), linear_before_reset=0's candidate sum."""
    g3 = 3 * hid
    for k in range(hid):
        w = p[off_rh + k * g3 + 2 * hid : off_rh + (k + 1) * g3]
        for j in range(hid):
            cand[j] += w[j] * rh[k]


@njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy", _nrt=False)
def activate_any(kind, alpha, beta, v):
    """Any activation of the ONNX RNN operators, with its alpha and beta (recurrent_ops.py
    defines them; plan.py resolves the defaults). Called, not inlined, like the *_any cells."""
    if kind <= ACT_IDENTITY:
        return activate(kind, alpha, v)
    if kind == ACT_AFFINE:
        return alpha * v + beta
    if kind == ACT_THRESHOLDED_RELU:
        return v if v >= alpha else ZERO
    if kind == ACT_SCALED_TANH:
        return alpha * tanh(beta * v)
    if kind == ACT_HARD_SIGMOID:
        return min(max(alpha * v + beta, ZERO), ONE)
    if kind == ACT_ELU:
        return v if v >= ZERO else alpha * np.float32(math.expm1(min(v, ZERO)))
    if kind == ACT_SOFTSIGN:
        return v / (ONE + abs(v))
    return max(v, ZERO) + np.float32(math.log1p(math.exp(-abs(v))))  # softplus, no overflow


@inline_kernel
def bound(v, limit):
    """The operators' `clip`: v within [-limit, limit] (limit is infinity when there is none)."""
    return min(max(v, -limit), limit)


@inline_kernel
def rnn(p, x, y, state, gates, n_in, hid, off_wt, off_b, off_h, act, off_alpha):
    """h = f(W x + R h + Wb + Rb), W and R stacked at off_wt as (I + H, H); y = h."""
    alpha = p[off_alpha]
    h = state[off_h : off_h + hid]
    stacked_sums(p, x, h, gates, n_in, hid, hid, off_wt, off_b)
    for j in range(hid):
        h[j] = activate(act, alpha, gates[j])
    copy(y, h, hid)


@inline_kernel
def lstm_update(gates, h, c, hid):
    """c and h in place from an LSTM step's summed gates (ONNX order i, o, f, c)."""
    gi, go = gates[:hid], gates[hid : 2 * hid]
    gf, gc = gates[2 * hid : 3 * hid], gates[3 * hid : 4 * hid]
    for j in range(hid):
        c[j] = sigmoid(gf[j]) * c[j] + sigmoid(gi[j]) * tanh(gc[j])
        h[j] = sigmoid(go[j]) * tanh(c[j])


@inline_kernel
def lstm(p, x, y, state, gates, n_in, hid, off_wt, off_b, off_h, off_c):
    """ONNX LSTM step, gates i, o, f, c; W and R stacked at off_wt as (I + H, 4H); y = h."""
    h = state[off_h : off_h + hid]
    c = state[off_c : off_c + hid]
    stacked_sums(p, x, h, gates, n_in, hid, 4 * hid, off_wt, off_b)
    lstm_update(gates, h, c, hid)
    copy(y, h, hid)


@inline_kernel
def gru(p, x, y, state, gates, n_in, hid, off_wx, off_rh, off_wb, off_rb, off_h, lbr):
    """ONNX GRU step, gates z, r, h; W (I, 3H) at off_wx, R (H, 3H) at off_rh; y = h.

    linear_before_reset=1 (PyTorch's form) applies r after R h + Rb; 0 applies it to h first,
    so the candidate's R term waits for r."""
    g3 = 3 * hid
    h = state[off_h : off_h + hid]
    gx, gh, rh = gates[:g3], gates[g3 : 2 * g3], gates[2 * g3 : 2 * g3 + hid]
    gru_sums(p, x, h, gx, gh, n_in, hid, off_wx, off_rh, off_wb, off_rb, lbr)
    z, r = gx[:hid], gx[hid : 2 * hid]
    for j in range(hid):
        z[j] = sigmoid(z[j] + gh[j])
        r[j] = sigmoid(r[j] + gh[hid + j])
        rh[j] = r[j] * h[j]
    cand = gh[2 * hid : g3]
    if not lbr:  # R_h (r * h) + Rb_h
        reset_sums(p, cand, rh, hid, off_rh)
    xh = gx[2 * hid : g3]
    for j in range(hid):
        n = tanh(xh[j] + r[j] * cand[j]) if lbr else tanh(xh[j] + cand[j])
        h[j] = (ONE - z[j]) * n + z[j] * h[j]
    copy(y, h, hid)


# The *_any cells: every option of the ONNX operators (clip, any activations with alpha and
# beta, LSTM peepholes and input_forget), for graphs that use them; the plain cells above stay
# as lean as the common case allows. `off_opt` points at the options block plan.py writes:
# [clip, then alpha and beta of each activation in order, then (LSTM) peepholes i, o, f].
# They are called, not inlined: inlined into the interpreter's four kernels (which hold every
# cell), their twelve-way activations made a cold compile take 246 s instead of 38 s.
# Without Numba's runtime, as the kernels that call them (specialize.py): a called function
# otherwise takes the setting of whichever caller compiled it first, and the cache keeps that.
any_cell = njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy", _nrt=False)


@any_cell
def rnn_any(p, x, y, state, gates, n_in, hid, off_wt, off_b, off_h, kind, off_opt):
    """rnn() with clip and any activation: h = f(clip(W x + R h + Wb + Rb))."""
    limit, alpha, beta = p[off_opt], p[off_opt + 1], p[off_opt + 2]
    h = state[off_h : off_h + hid]
    stacked_sums(p, x, h, gates, n_in, hid, hid, off_wt, off_b)
    for j in range(hid):
        h[j] = activate_any(kind, alpha, beta, bound(gates[j], limit))
    copy(y, h, hid)


@any_cell
def lstm_any(p, x, y, state, gates, n_in, hid, off_wt, off_b, off_h, off_c, off_opt, kf, kg, kh,
             input_forget):  # fmt: skip
    """lstm() with clip, activations f, g, h, peepholes (i and f see the old c, o the new) and
    input_forget (f = 1 - i, as ONNX Runtime couples them)."""
    limit = p[off_opt]
    af, bf, ag, bg, ah, bh = p[off_opt + 1 : off_opt + 7]
    peep = p[off_opt + 7 : off_opt + 7 + 3 * hid]
    pi, po, pf = peep[:hid], peep[hid : 2 * hid], peep[2 * hid : 3 * hid]
    g4 = 4 * hid
    h = state[off_h : off_h + hid]
    c = state[off_c : off_c + hid]
    stacked_sums(p, x, h, gates, n_in, hid, g4, off_wt, off_b)
    gi, go = gates[:hid], gates[hid : 2 * hid]
    gf, gc = gates[2 * hid : 3 * hid], gates[3 * hid : g4]
    for j in range(hid):
        old = c[j]
        i = activate_any(kf, af, bf, bound(gi[j] + pi[j] * old, limit))
        f = activate_any(kf, af, bf, bound(gf[j] + pf[j] * old, limit))
        if input_forget:
            f = ONE - i
        new = f * old + i * activate_any(kg, ag, bg, bound(gc[j], limit))
        o = activate_any(kf, af, bf, bound(go[j] + po[j] * new, limit))
        c[j] = new
        h[j] = o * activate_any(kh, ah, bh, new)
    copy(y, h, hid)


@any_cell
def gru_any(p, x, y, state, gates, n_in, hid, off_wx, off_rh, off_wb, off_rb, off_h, lbr,
            off_opt, kf, kg):  # fmt: skip
    """gru() with clip and activations f (z, r) and g (the candidate)."""
    limit = p[off_opt]
    af, bf, ag, bg = p[off_opt + 1 : off_opt + 5]
    g3 = 3 * hid
    h = state[off_h : off_h + hid]
    gx, gh, rh = gates[:g3], gates[g3 : 2 * g3], gates[2 * g3 : 2 * g3 + hid]
    gru_sums(p, x, h, gx, gh, n_in, hid, off_wx, off_rh, off_wb, off_rb, lbr)
    z, r = gx[:hid], gx[hid : 2 * hid]
    for j in range(hid):
        z[j] = activate_any(kf, af, bf, bound(z[j] + gh[j], limit))
        r[j] = activate_any(kf, af, bf, bound(r[j] + gh[hid + j], limit))
        rh[j] = r[j] * h[j]
    cand = gh[2 * hid : g3]
    if not lbr:
        reset_sums(p, cand, rh, hid, off_rh)
    xh = gx[2 * hid : g3]
    for j in range(hid):
        pre = xh[j] + r[j] * cand[j] if lbr else xh[j] + cand[j]
        n = activate_any(kg, ag, bg, bound(pre, limit))
        h[j] = (ONE - z[j]) * n + z[j] * h[j]
    copy(y, h, hid)


@inline_kernel
def dense(p, x, y, n_in, n_out, off_w, off_b):
    """y = x @ W + b, W (n_in, n_out) at off_w."""
    copy(y, p[off_b : off_b + n_out], n_out)
    matvec_into(y, p, off_w, n_in, n_out, x)


# The int8 cells (program.py's *Q ops): weights int8, packed four to a float32 slot of `p` and
# read through `p.view(np.int8)` (a view: no copy, no allocation), scaled per output channel
# after the sum. Activations and sums stay float32: weight-only quantization, so a model keeps
# its float twin's arithmetic but reads a quarter of the bytes per sample.


@inline_kernel
def scaled_sums(p, x, h, gates, n_in, hid, width, off_wq, off_rq, off_ws, off_rs, off_b):
    """gates[:width] = b + ws * (x @ Wq) + rs * (h @ Rq); gates[width:2 width] is scratch."""
    q = p.view(np.int8)
    gx, gh = gates[:width], gates[width : 2 * width]
    for j in range(width):
        gx[j] = ZERO
        gh[j] = ZERO
    matvec_into(gx, q, 4 * off_wq, n_in, width, x)
    matvec_into(gh, q, 4 * off_rq, hid, width, h)
    b, ws, rs = p[off_b : off_b + width], p[off_ws : off_ws + width], p[off_rs : off_rs + width]
    for j in range(width):
        gx[j] = b[j] + ws[j] * gx[j] + rs[j] * gh[j]


@inline_kernel
def rnn_q(p, x, y, state, gates, n_in, hid, off_wq, off_rq, off_ws, off_rs, off_b, off_h, act,
          off_alpha):  # fmt: skip
    alpha = p[off_alpha]
    h = state[off_h : off_h + hid]
    scaled_sums(p, x, h, gates, n_in, hid, hid, off_wq, off_rq, off_ws, off_rs, off_b)
    for j in range(hid):
        h[j] = activate(act, alpha, gates[j])
    copy(y, h, hid)


@inline_kernel
def lstm_q(p, x, y, state, gates, n_in, hid, off_wq, off_rq, off_ws, off_rs, off_b, off_h,
           off_c):  # fmt: skip
    h = state[off_h : off_h + hid]
    c = state[off_c : off_c + hid]
    scaled_sums(p, x, h, gates, n_in, hid, 4 * hid, off_wq, off_rq, off_ws, off_rs, off_b)
    lstm_update(gates, h, c, hid)
    copy(y, h, hid)


@inline_kernel
def gru_q(p, x, y, state, gates, n_in, hid, off_wq, off_rq, off_ws, off_rs, off_wb, off_rb,
          off_h):  # fmt: skip
    """gru() with linear_before_reset=1 (PyTorch's): gx = Wb + ws (x Wq), gh = Rb + rs (h Rq)."""
    g3 = 3 * hid
    q = p.view(np.int8)
    h = state[off_h : off_h + hid]
    gx, gh = gates[:g3], gates[g3 : 2 * g3]
    for j in range(g3):
        gx[j] = ZERO
        gh[j] = ZERO
    matvec_into(gx, q, 4 * off_wq, n_in, g3, x)
    matvec_into(gh, q, 4 * off_rq, hid, g3, h)
    wb, rb = p[off_wb : off_wb + g3], p[off_rb : off_rb + g3]
    ws, rs = p[off_ws : off_ws + g3], p[off_rs : off_rs + g3]
    for j in range(g3):
        gx[j] = wb[j] + ws[j] * gx[j]
        gh[j] = rb[j] + rs[j] * gh[j]
    for j in range(hid):
        z = sigmoid(gx[j] + gh[j])
        r = sigmoid(gx[hid + j] + gh[hid + j])
        n = tanh(gx[2 * hid + j] + r * gh[2 * hid + j])
        h[j] = (ONE - z) * n + z * h[j]
    copy(y, h, hid)


@inline_kernel
def dense_q(p, x, y, n_in, n_out, off_wq, off_s, off_b):
    """y = b + s * (x @ Wq), Wq int8 (n_in, n_out)."""
    for j in range(n_out):
        y[j] = ZERO
    matvec_into(y, p.view(np.int8), 4 * off_wq, n_in, n_out, x)
    b, s = p[off_b : off_b + n_out], p[off_s : off_s + n_out]
    for j in range(n_out):
        y[j] = b[j] + s[j] * y[j]


@inline_kernel
def lstm_decoder(p, x, y, state, gates, n_in, hid, off_wt, off_b, horizon):
    """A seq2seq decoder step (program.LstmDecoder): from zero h and c, `horizon` LSTM steps
    on the same input x; y[t * hid : (t + 1) * hid] is h after step t. x's share of the gates,
    b + x @ W, is the same every step: computed once. gates holds 10 * hid: that share, one
    step's gates, c, and a zero h."""
    g4 = 4 * hid
    gx, g = gates[:g4], gates[g4 : 2 * g4]
    c, zero = gates[2 * g4 : 2 * g4 + hid], gates[2 * g4 + hid : 2 * g4 + 2 * hid]
    copy(gx, p[off_b : off_b + g4], g4)
    matvec_into(gx, p, off_wt, n_in, g4, x)
    for j in range(hid):
        c[j] = ZERO
        zero[j] = ZERO
    for t in range(horizon):
        h_prev = zero if t == 0 else y[(t - 1) * hid : t * hid]
        copy(g, gx, g4)
        matvec_into(g, p, off_wt + n_in * g4, hid, g4, h_prev)
        lstm_update(g, y[t * hid : (t + 1) * hid], c, hid)


@inline_kernel
def dense_rows(p, x, y, rows, n_in, n_out, off_w, off_b):
    """dense() on each of `rows` rows: x (rows * n_in) -> y (rows * n_out)."""
    for r in range(rows):
        dense(p, x[r * n_in : (r + 1) * n_in], y[r * n_out : (r + 1) * n_out], n_in, n_out,
              off_w, off_b)  # fmt: skip


@inline_kernel
def affine(p, x, y, n, off_scale, off_shift):
    """y = x * scale + shift (feature scaling, folded Add/Sub/Mul/Div)."""
    scale, shift = p[off_scale : off_scale + n], p[off_shift : off_shift + n]
    for j in range(n):
        y[j] = x[j] * scale[j] + shift[j]


@inline_kernel
def act(p, x, y, n, kind, off_alpha):
    alpha = p[off_alpha]
    for j in range(n):
        y[j] = activate(kind, alpha, x[j])


@inline_kernel
def transform_in(x, y, state, n_in, n_t, lag, log, off_lag):
    """program.TransformIn: the targets' change since `lag` samples back (or their log)."""
    for j in range(n_in):
        y[j] = x[j]
    if lag == 0:
        if log:
            for j in range(n_t):
                y[j] = np.log(x[j])
        return
    past = state[off_lag : off_lag + (1 + lag) * n_t]
    if past[0] == ZERO:  # a fresh stream: its first sample is its past
        for i in range(1, lag + 1):
            for j in range(n_t):
                past[i * n_t + j] = x[j]
    for j in range(n_t):
        old = past[n_t + j]
        y[j] = np.log(x[j] / old) if log else x[j] - old


@inline_kernel
def transform_out(sample, x, y, state, n_out, n_t, lag, log, seasonal, off_lag):
    """program.TransformOut: forecasts in physical units, then the past moves on by the
    sample."""
    if lag == 0:
        for i in range(n_out):
            y[i] = np.exp(x[i]) if log else x[i]
        return
    past = state[off_lag : off_lag + (1 + lag) * n_t]
    for i in range(n_out):
        k, j = i // n_t + 1, i % n_t  # step t + k, target j
        base = past[(1 + k) * n_t + j] if seasonal and k < lag else sample[j]
        y[i] = base * np.exp(x[i]) if log else base + x[i]
    for i in range(1, lag):
        for j in range(n_t):
            past[i * n_t + j] = past[(i + 1) * n_t + j]
    for j in range(n_t):
        past[lag * n_t + j] = sample[j]
        past[j] = ONE


@inline_kernel
def softmax(x, y, n):
    peak = x[0]
    for j in range(n):
        peak = max(peak, x[j])
    total = ZERO
    for j in range(n):
        y[j] = np.exp(x[j] - peak)
        total += y[j]
    for j in range(n):
        y[j] /= total


@inline_kernel
def all_finite(x):
    """No NaN or infinity in a flat array: one vectorised compare-and-count (|v| <= max is
    false exactly for those), not first_bad's branch per element. No arithmetic on v that
    fast-math could fold or reassociate (v - v became 0 here)."""
    ok = 0
    for j in range(x.shape[0]):
        ok += abs(x[j]) <= FLOAT32_MAX
    return ok == x.shape[0]


@inline_kernel
def first_bad(x):
    """Index of the first NaN or infinity in a flat array, or -1."""
    for j in range(x.shape[0]):
        if not np.isfinite(x[j]):
            return j
    return -1
