"""Plain NumPy reference for the ONNX RNN, GRU and LSTM operators (opset 14+), every attribute.

Why: the Numba kernels need an oracle that is obviously right rather than fast. Each function
follows the equations of https://onnx.ai/onnx/operators/ line by line, loops over time, and
vectorises only over the batch. Arithmetic runs in float64 so the reference's own rounding is
negligible next to the float32 kernels it checks; results come back as float32.

Gate orders are ONNX's, not PyTorch's: LSTM rows of w, r, b are i, o, f, c (peepholes p: i, o, f);
GRU rows are z, r, h. b is [Wb, Rb] concatenated. Layout 0 is [seq, batch, feature], layout 1
is [batch, seq, feature].
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from edgeseq.errors import ModelFormatError, ShapeError

Activation = Callable[[np.ndarray], np.ndarray]
Step = Callable[[np.ndarray, tuple[np.ndarray, ...]], tuple[np.ndarray, ...]]

# Keyed by lower-case name (the spec's names are matched case-insensitively); f(x, alpha, beta).
# Written so that no branch overflows: warnings are errors in the tests.
ACTIVATIONS: dict[str, Callable[[np.ndarray, float, float], np.ndarray]] = {
    "relu": lambda x, a, b: np.maximum(x, 0.0),
    "tanh": lambda x, a, b: np.tanh(x),
    "sigmoid": lambda x, a, b: 0.5 * (1.0 + np.tanh(0.5 * x)),
    "affine": lambda x, a, b: a * x + b,
    "leakyrelu": lambda x, a, b: np.where(x >= 0, x, a * x),
    "thresholdedrelu": lambda x, a, b: np.where(x >= a, x, 0.0),
    "scaledtanh": lambda x, a, b: a * np.tanh(b * x),
    "hardsigmoid": lambda x, a, b: np.clip(a * x + b, 0.0, 1.0),
    "elu": lambda x, a, b: np.where(x >= 0, x, a * np.expm1(np.minimum(x, 0.0))),
    "softsign": lambda x, a, b: x / (1.0 + np.abs(x)),
    "softplus": lambda x, a, b: np.logaddexp(0.0, x),
}

# The parameters each activation takes, with the default of the standalone ONNX operator of the
# same name, as the spec prescribes. ScaledTanh's operator gave none (None here), so a model must.
_PARAMETERS: dict[str, dict[str, float | None]] = {
    "affine": {"alpha": 1.0, "beta": 0.0},
    "leakyrelu": {"alpha": 0.01},
    "thresholdedrelu": {"alpha": 1.0},
    "scaledtanh": {"alpha": None, "beta": None},
    "hardsigmoid": {"alpha": 0.2, "beta": 0.5},
    "elu": {"alpha": 1.0},
}

DIRECTIONS = {"forward": 1, "reverse": 1, "bidirectional": 2}
DEFAULT_ACTIVATIONS = {  # per direction, when a node names none
    "RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]
}  # fmt: skip


def _key(name: str) -> str:
    key = name.lower()
    if key not in ACTIVATIONS:
        raise ModelFormatError(
            f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)} (any case)"
        )
    return key


def _parameter(name: str, which: str, given: float | None) -> float:
    """The value `given`, else the ONNX default; a parameter the function ignores is 0."""
    parameters = _PARAMETERS.get(_key(name), {})
    value = given if given is not None else parameters.get(which)
    if value is None and which in parameters:
        raise ModelFormatError(f"activation {name!r} needs activation_{which}: ONNX has no default")
    return 0.0 if value is None else float(value)


def activation(name: str, alpha: float | None = None, beta: float | None = None) -> Activation:
    """The spec's activation `name` (any case) as a one-argument function; None means default."""
    return _function((_key(name), _parameter(name, "alpha", alpha), _parameter(name, "beta", beta)))


ActivationSpec = tuple[str, float, float]  # lower-case name, alpha, beta (defaults resolved)


def _function(spec: ActivationSpec) -> Activation:
    f, a, b = ACTIVATIONS[spec[0]], spec[1], spec[2]
    return lambda x: f(x, a, b)


def activation_specs(
    names: Sequence[str] | None,
    alphas: Sequence[float] | None,
    betas: Sequence[float] | None,
    defaults: list[str],
    num_directions: int,
) -> list[list[ActivationSpec]]:
    """One list of (name, alpha, beta) per direction: what the attributes mean, resolved once
    for both this reference and the fused kernels (plan.py).

    alpha and beta are consumed in order by the functions that take them ("consumed in the order
    of activation functions"), not indexed by position; defaults fill in once they run out.
    """
    names = list(defaults) * num_directions if names is None else list(names)
    if len(names) != len(defaults) * num_directions:
        raise ModelFormatError(f"activations {names!r}: expected {len(defaults)} per direction")
    alpha_it, beta_it = iter(alphas or []), iter(betas or [])
    specs = [_consume(name, alpha_it, beta_it) for name in names]
    return [specs[d * len(defaults) : (d + 1) * len(defaults)] for d in range(num_directions)]


def _activations(
    names: Sequence[str] | None,
    alphas: Sequence[float] | None,
    betas: Sequence[float] | None,
    defaults: list[str],
    num_directions: int,
) -> list[list[Activation]]:
    specs = activation_specs(names, alphas, betas, defaults, num_directions)
    return [[_function(spec) for spec in direction] for direction in specs]


def _consume(name: str, alphas: Iterator[float], betas: Iterator[float]) -> ActivationSpec:
    parameters = _PARAMETERS.get(_key(name), {})
    alpha = next(alphas, None) if "alpha" in parameters else None
    beta = next(betas, None) if "beta" in parameters else None
    return _key(name), _parameter(name, "alpha", alpha), _parameter(name, "beta", beta)


def rnn_activations(activations: Sequence[str] | None, num_directions: int) -> list[str] | None:
    """The schema's own default for RNN, ["Tanh", "Tanh"], names 2 for one direction: the
    first is the one meant."""
    if activations is not None and len(activations) == 2 and num_directions == 1:
        return list(activations[:1])
    return None if activations is None else list(activations)


def _clip(a: np.ndarray, clip: float | None) -> np.ndarray:
    """The spec's `clip`: bound an activation's input to [-clip, clip]; None means no bound."""
    return a if clip is None else np.clip(a, -clip, clip)


def _weights(
    w: np.ndarray,
    r: np.ndarray,
    b: np.ndarray | None,
    gates: int,
    hidden_size: int | None,
    direction: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """w, r and b's halves Wb, Rb in float64, checked against the attributes; absent b is 0."""
    w, r = np.asarray(w, np.float64), np.asarray(r, np.float64)
    n, hidden = DIRECTIONS.get(direction), r.shape[-1]
    if n is None:
        raise ModelFormatError(f"direction {direction!r}; expected one of {list(DIRECTIONS)}")
    if hidden_size is not None and hidden_size != hidden:
        raise ModelFormatError(f"hidden_size={hidden_size} but R has shape {r.shape}")
    if w.ndim != 3 or w.shape[:2] != (n, gates * hidden) or r.shape != (n, gates * hidden, hidden):
        raise ShapeError(f"W {w.shape}, R {r.shape}: expected ({n}, {gates}*hidden, ...)")
    b = np.zeros((n, 2 * gates * hidden)) if b is None else np.asarray(b, np.float64)
    if b.shape != (n, 2 * gates * hidden):
        raise ShapeError(f"B has shape {b.shape}; expected {(n, 2 * gates * hidden)}")
    wb, rb = np.split(b, 2, axis=-1)
    return w, r, wb, rb


def _scan(
    step: Step, x: np.ndarray, state: tuple[np.ndarray, ...], lengths: np.ndarray, reverse: bool
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Run one direction over x [seq, batch, input]; return Y [seq, batch, hidden], final state.

    Batch entry n sees only its first lengths[n] steps, so `reverse` reverses each entry within
    its own length; later steps leave Y at zero and the state as it was, so the final state is
    the one at the last valid step. The spec is silent on an empty sequence: its final state is
    zeros here, as in ONNX Runtime, not the initial state.
    """
    seq_length, batch = x.shape[:2]
    y = np.zeros((seq_length, batch, state[0].shape[-1]))
    rows = np.arange(batch)
    for k in range(seq_length):
        valid = k < lengths  # (batch,)
        t = np.where(valid, lengths - 1 - k if reverse else k, 0)  # time index per entry
        new = step(x[t, rows], state)
        state = tuple(np.where(valid[:, None], n, s) for n, s in zip(new, state, strict=True))
        y[t[valid], rows[valid]] = state[0][valid]
    return y, tuple(np.where((lengths > 0)[:, None], s, 0.0) for s in state)


def _layout_0(a: np.ndarray, layout: int) -> np.ndarray:
    """X or an initial state in layout 0, float64: layout 1 only swaps the first two axes."""
    if layout not in (0, 1):
        raise ModelFormatError(f"layout={layout}; expected 0 or 1")
    return np.asarray(a, np.float64).swapaxes(0, layout)


def _lengths(sequence_lens: np.ndarray | None, seq_length: int, batch: int) -> np.ndarray:
    """Each batch entry's number of valid steps; without sequence_lens, all of them."""
    if sequence_lens is None:
        return np.full(batch, seq_length)
    lengths = np.asarray(sequence_lens)
    if lengths.shape != (batch,) or np.any(lengths < 0) or np.any(lengths > seq_length):
        raise ShapeError(f"sequence_lens {lengths!r}: expected {batch} values in [0, {seq_length}]")
    return lengths


def _recur(
    steps: list[Step],
    x: np.ndarray,
    initial: list[np.ndarray | None],
    sequence_lens: np.ndarray | None,
    attributes: tuple[str, int, int],
) -> tuple[np.ndarray, ...]:
    """What all three ops share: layouts, defaults, each direction scanned, outputs stacked.

    steps has one step per direction; attributes are (direction, layout, hidden_size).
    Returns Y then each final state, in `layout`, float32.
    """
    direction, layout, hidden = attributes
    x = _layout_0(x, layout)  # [seq, batch, input]
    lengths = _lengths(sequence_lens, *x.shape[:2])
    shape = (len(steps), x.shape[1], hidden)
    states = [np.zeros(shape) if s is None else _layout_0(s, layout) for s in initial]
    runs = []
    for d, step in enumerate(steps):
        reverse = direction == "reverse" or d == 1
        runs.append(_scan(step, x, tuple(s[d] for s in states), lengths, reverse))
    y = np.stack([y_d for y_d, _ in runs], axis=1)  # [seq, num_directions, batch, hidden]
    finals = [np.stack(s, axis=0) for s in zip(*(s_d for _, s_d in runs), strict=True)]
    if layout == 1:
        y, finals = y.transpose(2, 0, 1, 3), [s.swapaxes(0, 1) for s in finals]
    return tuple(a.astype(np.float32) for a in (y, *finals))


def _rnn_step(
    w: np.ndarray, r: np.ndarray, b: np.ndarray, f: Activation, clip: float | None
) -> Step:
    """One direction's RNN step; b = Wb + Rb."""

    def step(x_t: np.ndarray, state: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        return (f(_clip(x_t @ w.T + state[0] @ r.T + b, clip)),)

    return step


def rnn(
    x: np.ndarray,
    w: np.ndarray,
    r: np.ndarray,
    b: np.ndarray | None = None,
    sequence_lens: np.ndarray | None = None,
    initial_h: np.ndarray | None = None,
    *,
    hidden_size: int | None = None,
    direction: str = "forward",
    layout: int = 0,
    activations: Sequence[str] | None = None,
    activation_alpha: Sequence[float] | None = None,
    activation_beta: Sequence[float] | None = None,
    clip: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """ONNX RNN: Ht = f(Xt W^T + Ht-1 R^T + Wb + Rb), default f=Tanh. Returns Y, Y_h."""
    w, r, wb, rb = _weights(w, r, b, 1, hidden_size, direction)
    activations = rnn_activations(activations, len(w))
    defaults = DEFAULT_ACTIVATIONS["RNN"]
    fs = _activations(activations, activation_alpha, activation_beta, defaults, len(w))
    steps = [_rnn_step(*d, clip) for d in zip(w, r, wb + rb, [f for (f,) in fs], strict=True)]
    y, y_h = _recur(steps, x, [initial_h], sequence_lens, (direction, layout, r.shape[-1]))
    return y, y_h


def _gru_step(
    w: np.ndarray,
    r: np.ndarray,
    wb: np.ndarray,
    rb: np.ndarray,
    fs: list[Activation],
    clip: float | None,
    linear_before_reset: int,
) -> Step:
    """One direction's GRU step; w, r, wb, rb hold rows z, r, h; fs is (f, g)."""
    (w_z, w_r, w_h), (r_z, r_r, r_h) = np.split(w, 3), np.split(r, 3)
    (wb_z, wb_r, wb_h), (rb_z, rb_r, rb_h) = np.split(wb, 3), np.split(rb, 3)
    f, g = fs

    def step(x_t: np.ndarray, state: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        (h,) = state
        z_t = f(_clip(x_t @ w_z.T + h @ r_z.T + wb_z + rb_z, clip))
        r_t = f(_clip(x_t @ w_r.T + h @ r_r.T + wb_r + rb_r, clip))
        if linear_before_reset:
            hh = x_t @ w_h.T + r_t * (h @ r_h.T + rb_h) + wb_h
        else:
            hh = x_t @ w_h.T + (r_t * h) @ r_h.T + rb_h + wb_h
        h_tilde = g(_clip(hh, clip))
        return ((1.0 - z_t) * h_tilde + z_t * h,)

    return step


def gru(
    x: np.ndarray,
    w: np.ndarray,
    r: np.ndarray,
    b: np.ndarray | None = None,
    sequence_lens: np.ndarray | None = None,
    initial_h: np.ndarray | None = None,
    *,
    hidden_size: int | None = None,
    direction: str = "forward",
    layout: int = 0,
    activations: Sequence[str] | None = None,
    activation_alpha: Sequence[float] | None = None,
    activation_beta: Sequence[float] | None = None,
    clip: float | None = None,
    linear_before_reset: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """ONNX GRU (gates z, r, h; default f=Sigmoid, g=Tanh). Returns Y, Y_h."""
    w, r, wb, rb = _weights(w, r, b, 3, hidden_size, direction)
    defaults = DEFAULT_ACTIVATIONS["GRU"]
    fs = _activations(activations, activation_alpha, activation_beta, defaults, len(w))
    steps = [_gru_step(*d, clip, linear_before_reset) for d in zip(w, r, wb, rb, fs, strict=True)]
    y, y_h = _recur(steps, x, [initial_h], sequence_lens, (direction, layout, r.shape[-1]))
    return y, y_h


def _lstm_step(
    w: np.ndarray,
    r: np.ndarray,
    b: np.ndarray,
    p: np.ndarray,
    fs: list[Activation],
    clip: float | None,
    input_forget: int,
) -> Step:
    """One direction's LSTM step; rows i, o, f, c; b = Wb + Rb; p is (Pi, Po, Pf); fs (f, g, h).

    input_forget couples the gates as ONNX Runtime does: ft = 1 - it (the forget gate's own
    weights and peephole are then unused). Peepholes see Ct-1 for i and f, Ct for o.
    """
    p_i, p_o, p_f = np.split(p, 3)
    f, g, h_act = fs

    def step(x_t: np.ndarray, state: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        h, c = state
        i, o, f_gate, c_gate = np.split(x_t @ w.T + h @ r.T + b, 4, axis=-1)
        i_t = f(_clip(i + p_i * c, clip))
        f_t = 1.0 - i_t if input_forget else f(_clip(f_gate + p_f * c, clip))
        c_t = f_t * c + i_t * g(_clip(c_gate, clip))
        o_t = f(_clip(o + p_o * c_t, clip))
        return (o_t * h_act(c_t), c_t)

    return step


def lstm(
    x: np.ndarray,
    w: np.ndarray,
    r: np.ndarray,
    b: np.ndarray | None = None,
    sequence_lens: np.ndarray | None = None,
    initial_h: np.ndarray | None = None,
    initial_c: np.ndarray | None = None,
    p: np.ndarray | None = None,
    *,
    hidden_size: int | None = None,
    direction: str = "forward",
    layout: int = 0,
    activations: Sequence[str] | None = None,
    activation_alpha: Sequence[float] | None = None,
    activation_beta: Sequence[float] | None = None,
    clip: float | None = None,
    input_forget: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ONNX LSTM (gates i, o, f, c; default f=Sigmoid, g=h=Tanh). Returns Y, Y_h, Y_c."""
    w, r, wb, rb = _weights(w, r, b, 4, hidden_size, direction)
    defaults = DEFAULT_ACTIVATIONS["LSTM"]
    fs = _activations(activations, activation_alpha, activation_beta, defaults, len(w))
    p = np.zeros((len(w), 3 * r.shape[-1])) if p is None else np.asarray(p, np.float64)
    if p.shape != (len(w), 3 * r.shape[-1]):
        raise ShapeError(f"P has shape {p.shape}; expected {(len(w), 3 * r.shape[-1])}")
    steps = [_lstm_step(*d, clip, input_forget) for d in zip(w, r, wb + rb, p, fs, strict=True)]
    initial = [initial_h, initial_c]
    y, y_h, y_c = _recur(steps, x, initial, sequence_lens, (direction, layout, r.shape[-1]))
    return y, y_h, y_c
