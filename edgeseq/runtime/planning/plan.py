"""ONNX graph -> Plan: the fused program the kernels run, one sample at a time.

This is the one place that knows ONNX's weight layouts and gate orders: W is
[dirs, gates * H, inputs], R is [dirs, gates * H, H], B is [dirs, 2 * gates * H] (Wb then Rb);
gates are i, o, f, c for LSTM and z, r, h for GRU. The kernels take each layer's W and R
transposed and stacked, [inputs + H, gates * H], so one pass over [x; h] updates all gates.

The plan follows the per-sample data path from the input `x` to the first output: affine
scaling, recurrent layers, dense heads and activations, with shape glue (Transpose, Squeeze,
Reshape, ...) passed through, and so is a many-to-one model's pick of the last step or the
final state (y[:, -1], hn[-1]): streaming, the newest step is the sample itself. Recurrent nodes
with clip, other activations, peepholes or input_forget get the *_ANY cells. Graphs outside
that pattern (reverse or bidirectional layers, sequence_lens, seq2seq decoders) get no plan;
`verify` proves a plan against the graph's straightforward evaluation before it is used.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from edgeseq.artifact import X_MODEL, Y_MODEL
from edgeseq.runtime.graphs import recurrent_ops
from edgeseq.runtime.graphs.graph import Graph, Node, fold_constants
from edgeseq.runtime.kernels import aligned, cells
from edgeseq.runtime.kernels import program as ir
from edgeseq.runtime.planning import int8_weights as int8
from edgeseq.spec import TargetTransform

GLUE = ("Identity", "Transpose", "Squeeze", "Unsqueeze", "Reshape", "Cast")
ACTIVATIONS = {
    "Relu": cells.ACT_RELU,
    "Tanh": cells.ACT_TANH,
    "Sigmoid": cells.ACT_SIGMOID,
    "LeakyRelu": cells.ACT_LEAKY_RELU,
}
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4, "DynamicQuantizeLSTM": 4}


class NoPlan(Exception):
    """The graph is valid but outside what the fused kernels cover (the reason says why)."""


@dataclass
class RecurrentLayer:
    """Where one recurrent node's state lives in a stream's flat state vector."""

    node: str
    cell: str
    hidden: int
    h_offset: int
    c_offset: int = -1  # LSTM only


@dataclass
class Plan:
    ops: list[ir.Op]  # the program (program.py), input to output
    params: np.ndarray  # (P,) float32
    n_features: int
    n_outputs: int
    width: int  # scratch row length
    layers: list[RecurrentLayer]
    initial_state: np.ndarray  # (S,) float32
    output: str
    lag: tuple[int, int] | None = None  # a target transform's past: (offset, size) in the state

    @property
    def state_size(self) -> int:
        return int(self.initial_state.shape[0])

    @functools.cached_property
    def code(self) -> np.ndarray:
        """The program as the interpreter kernels read it: (ops, CODE_WIDTH) int64."""
        return ir.encode(self.ops)

    def uses(self, *kinds: type[ir.Op]) -> bool:
        """Whether any op of the program is of one of these kinds."""
        return any(isinstance(op, kinds) for op in self.ops)


@dataclass
class _Builder:
    params: list[np.ndarray] = field(default_factory=lambda: [np.zeros(1, np.float32)])
    size: int = 1  # params[0] is a zero, the alpha of activations that have none
    ops: list[ir.Op] = field(default_factory=list)
    state: list[np.ndarray] = field(default_factory=list)
    state_size: int = 0
    width: int = 1
    rows: int = 1  # the data path is `rows` rows of n values (a seq2seq decoder's steps)
    repeat: int = 0  # an Expand asked for the next recurrent node to read its input this often
    scale: np.ndarray | None = None  # pending affine v * scale + shift
    shift: np.ndarray | None = None

    def put(self, values: np.ndarray) -> int:
        """Append a block of parameters; blocks longer than a cache line start on one."""
        arr = np.ascontiguousarray(values, np.float32).ravel()
        if arr.size >= aligned.LINE_FLOATS and self.size % aligned.LINE_FLOATS:
            pad = aligned.align_up(self.size) - self.size
            self.params.append(np.zeros(pad, np.float32))
            self.size += pad
        offset = self.size
        self.params.append(arr)
        self.size += arr.size
        return offset

    def put_int8(self, q: np.ndarray) -> int:
        """Append an int8 block, four values to a float32 slot (zero-padded to whole slots);
        returns its offset in slots (the kernels read it from byte 4 * offset)."""
        raw = np.ascontiguousarray(q, np.int8).ravel()
        padded = np.zeros(-(-raw.size // 4) * 4, np.int8)
        padded[: raw.size] = raw
        return self.put(padded.view(np.float32))

    def own_state(self, initial: np.ndarray) -> int:
        offset = self.state_size
        self.state.append(np.asarray(initial, np.float32).ravel())
        self.state_size += initial.size
        return offset

    def emit(self, op: ir.Op) -> None:
        self.ops.append(op)

    def flush_affine(self, n: int) -> None:
        """Emit the pending affine map over the data path: constants of one row's width apply
        to each row alike, those of every row's values (after a Reshape that flattened a
        decoder's steps) one to one."""
        if self.scale is None or self.shift is None:
            return
        total = n * self.rows
        self.emit(ir.Affine(total, self.put(self._spread(self.scale, n)),
                            self.put(self._spread(self.shift, n))))  # fmt: skip
        self.scale = self.shift = None

    def _spread(self, const: np.ndarray, n: int) -> np.ndarray:
        flat = np.asarray(const, np.float32).ravel()
        if flat.size == n * self.rows:
            return flat
        return np.tile(np.broadcast_to(flat, (n,)), self.rows)


def _affine(b: _Builder, op: str, const: np.ndarray, const_first: bool) -> None:
    """Fold v (op) const into the pending affine v * scale + shift."""
    scale = np.ones(1, np.float32) if b.scale is None else b.scale
    shift = np.zeros(1, np.float32) if b.shift is None else b.shift
    c = np.asarray(const, np.float32).ravel()
    if op == "Add":
        shift = shift + c
    elif op == "Sub" and not const_first:
        shift = shift - c
    elif op == "Sub":  # c - v
        scale, shift = -scale, c - shift
    elif op == "Mul":
        scale, shift = scale * c, shift * c
    elif op == "Div" and not const_first:
        scale, shift = scale / c, shift / c
    else:
        raise NoPlan("division by the data path is not an affine map")
    b.scale, b.shift = scale, shift


def _weights(
    node: Node, consts: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W [gates*H, I], R [gates*H, H], B [2*gates*H] of a forward single-direction node."""
    missing = [n for n in node.inputs[1:3] if n not in consts]
    if missing:
        raise NoPlan(f"node {node.name!r}: weights {missing} are computed at run time")
    w, r = consts[node.inputs[1]], consts[node.inputs[2]]
    if node.op == "DynamicQuantizeLSTM":  # int8 [dirs, in, 4H] with per-channel scales

        def deq(q: np.ndarray, scale: str, zero: str) -> np.ndarray:
            zp = consts[zero].astype(np.int32)[:, None, :] if zero in consts else 0
            return ((q.astype(np.int32) - zp) * consts[scale][:, None, :]).transpose(0, 2, 1)

        names = list(node.inputs) + [""] * (12 - len(node.inputs))
        w, r = deq(w, names[8], names[9]), deq(r, names[10], names[11])
    gates = GATES[node.op] * r.shape[-1]
    has_b = len(node.inputs) > 3 and node.inputs[3]
    b = consts[node.inputs[3]][0] if has_b else np.zeros(2 * gates, np.float32)
    return w[0].astype(np.float32), r[0].astype(np.float32), b.astype(np.float32)


KINDS = {  # recurrent_ops.ACTIVATIONS' names -> the kernels' codes
    "relu": cells.ACT_RELU, "tanh": cells.ACT_TANH, "sigmoid": cells.ACT_SIGMOID,
    "leakyrelu": cells.ACT_LEAKY_RELU, "affine": cells.ACT_AFFINE,
    "thresholdedrelu": cells.ACT_THRESHOLDED_RELU, "scaledtanh": cells.ACT_SCALED_TANH,
    "hardsigmoid": cells.ACT_HARD_SIGMOID, "elu": cells.ACT_ELU, "softsign": cells.ACT_SOFTSIGN,
    "softplus": cells.ACT_SOFTPLUS,
}  # fmt: skip
NO_CLIP = float("inf")  # bound(v, NO_CLIP) is v, infinities included


@dataclass
class _Options:
    """What a recurrent node asks beyond the plain cells: the *_ANY cells' row values."""

    activations: list[recurrent_ops.ActivationSpec]
    clip: float | None
    peepholes: np.ndarray | None  # (3H,) i, o, f
    input_forget: int

    def plain(self, op: str) -> bool:
        names = [name for name, _, _ in self.activations]
        default = [n.lower() for n in recurrent_ops.DEFAULT_ACTIVATIONS[op]]
        return (
            (names == default or (op == "RNN" and names == ["relu"]))
            and self.clip is None and self.peepholes is None and not self.input_forget
        )  # fmt: skip

    def block(self, hidden: int) -> np.ndarray:
        """The options block the *_any cells read: clip, each activation's alpha and beta,
        then (LSTM) the peepholes."""
        values = [NO_CLIP if self.clip is None else self.clip]
        values += [v for _, alpha, beta in self.activations for v in (alpha, beta)]
        block = np.array(values, np.float32)
        if len(self.activations) == 3:
            peep = np.zeros(3 * hidden) if self.peepholes is None else self.peepholes
            block = np.concatenate([block, np.asarray(peep, np.float32)])
        return block

    def kinds(self) -> list[int]:
        return [KINDS[name] for name, _, _ in self.activations]


def _cell(node: Node) -> str:
    """RNN, GRU or LSTM: ONNX Runtime's int8 LSTM is an LSTM."""
    return {"DynamicQuantizeLSTM": "LSTM"}.get(node.op, node.op)


def _options(node: Node, consts: dict[str, np.ndarray]) -> _Options:
    """The node's options; NoPlan for what one-sample streaming cannot fuse (other directions,
    sequence_lens, run-time peepholes)."""
    a = node.attrs
    op = _cell(node)
    reasons = []
    if a.get("direction", "forward") != "forward":
        reasons.append(f"direction {a['direction']}")
    names = list(node.inputs) + [""] * 8
    if names[4]:
        reasons.append("sequence_lens")
    if names[7] and names[7] not in consts:
        reasons.append("peepholes computed at run time")
    if reasons:
        raise NoPlan(f"node {node.name!r} ({node.op}) uses {', '.join(reasons)}")
    acts = a.get("activations")
    if op == "RNN":
        acts = recurrent_ops.rnn_activations(acts, 1)
    defaults = recurrent_ops.DEFAULT_ACTIVATIONS[op]
    specs = recurrent_ops.activation_specs(
        acts, a.get("activation_alpha"), a.get("activation_beta"), defaults, 1
    )[0]
    peepholes = consts[names[7]].reshape(-1) if names[7] else None
    if peepholes is not None and not np.any(peepholes):
        peepholes = None
    clip = a.get("clip")
    return _Options(specs, None if clip is None else float(clip), peepholes,
                    int(a.get("input_forget", 0)))  # fmt: skip


def _initial(node: Node, slot: int, hidden: int, consts: dict[str, np.ndarray]) -> np.ndarray:
    """A constant initial state (learned), or zeros when it comes from a graph input."""
    name = node.inputs[slot] if len(node.inputs) > slot else ""
    if not name or name not in consts:
        return np.zeros(hidden, np.float32)
    value = consts[name]
    if value.shape[-2 if node.attrs.get("layout", 0) == 0 else 0] != 1:
        raise NoPlan(f"node {node.name!r}: its constant initial state has a batch dimension")
    return value.reshape(-1)[:hidden].astype(np.float32)


Int8Pair = tuple[int8.Int8Matrix, int8.Int8Matrix]  # W and R


def _int8_pair(
    node: Node, consts: dict[str, np.ndarray], producers: dict[str, Node]
) -> Int8Pair | None:
    """A recurrent node's W and R as int8 (int8_weights.py), or None: float weights."""
    if node.op == "DynamicQuantizeLSTM":
        return int8.dynamic_lstm_weights(node, consts)
    if node.op == "GRU" and int(node.attrs.get("linear_before_reset", 0)) != 1:
        return None  # the int8 GRU cell is PyTorch's form only
    w = int8.recurrent_weight(node.inputs[1], producers, consts)
    r = int8.recurrent_weight(node.inputs[2], producers, consts)
    return None if w is None or r is None else (w, r)


def _recurrent_int8(b: _Builder, cell: str, pair: Int8Pair, bias: np.ndarray,
                    layer: RecurrentLayer, n_in: int, act: int) -> None:  # fmt: skip
    """Emit the int8 op of a plain cell (weights int8, scales and biases float32)."""
    (w, r), hid = pair, layer.hidden
    wq, rq, ws, rs = b.put_int8(w.q), b.put_int8(r.q), b.put(w.scale), b.put(r.scale)
    gates = w.q.shape[1]
    if cell == "GRU":
        b.emit(ir.GruQ(n_in, hid, wq, rq, ws, rs, b.put(bias[:gates]), b.put(bias[gates:]),
                       layer.h_offset))  # fmt: skip
        return
    fused_b = b.put(bias[:gates] + bias[gates:])
    if cell == "LSTM":
        b.width = max(b.width, 8 * hid)  # x and h sums apart: each has its own scales
        b.emit(ir.LstmQ(n_in, hid, wq, rq, ws, rs, fused_b, layer.h_offset, layer.c_offset))
    else:
        b.emit(ir.RnnQ(n_in, hid, wq, rq, ws, rs, fused_b, layer.h_offset, act, 0))


def _recurrent(
    b: _Builder, node: Node, consts: dict[str, np.ndarray], n_in: int,
    producers: dict[str, Node],
) -> tuple[int, RecurrentLayer]:  # fmt: skip
    options = _options(node, consts)
    plain = options.plain(cell := _cell(node))
    w, r, bias = _weights(node, consts)
    hidden = r.shape[1]
    if options.peepholes is not None and options.peepholes.size != 3 * hidden:
        raise NoPlan(f"node {node.name!r}: P has {options.peepholes.size} values; expected "
                     f"3 * hidden_size = {3 * hidden}")  # fmt: skip
    if w.shape[1] != n_in:
        raise NoPlan(f"node {node.name!r} takes {w.shape[1]} inputs, the data path has {n_in}")
    b.width = max(b.width, 7 * hidden, n_in)
    h_off = b.own_state(_initial(node, 5, hidden, consts))
    layer = RecurrentLayer(node.name, cell.lower(), hidden, h_off)
    pair = _int8_pair(node, consts, producers) if plain else None
    if pair is not None:
        if cell == "LSTM":
            layer.c_offset = b.own_state(_initial(node, 6, hidden, consts))
        _recurrent_int8(b, cell, pair, bias, layer, n_in, options.kinds()[0])
        return hidden, layer
    if cell == "GRU":
        g3 = 3 * hidden
        wx, rh, wb, rb = b.put(w.T), b.put(r.T), b.put(bias[:g3]), b.put(bias[g3:])
        lbr = int(node.attrs.get("linear_before_reset", 0))
        if plain:
            b.emit(ir.Gru(n_in, hidden, wx, rh, wb, rb, h_off, lbr))
        else:
            kf, kg = options.kinds()
            opts = b.put(options.block(hidden))
            b.emit(ir.GruAny(n_in, hidden, wx, rh, wb, rb, h_off, lbr, opts, kf, kg))
        return hidden, layer
    wt = b.put(np.concatenate([w.T, r.T], axis=0))
    gates = w.shape[0]
    fused_b = b.put(bias[:gates] + bias[gates:])
    if cell == "LSTM":
        layer.c_offset = b.own_state(_initial(node, 6, hidden, consts))
        if plain:
            b.emit(ir.Lstm(n_in, hidden, wt, fused_b, h_off, layer.c_offset))
        else:
            kf, kg, kh = options.kinds()
            opts = b.put(options.block(hidden))
            b.emit(ir.LstmAny(n_in, hidden, wt, fused_b, h_off, layer.c_offset, opts, kf, kg, kh,
                              options.input_forget))  # fmt: skip
    elif plain:
        b.emit(ir.Rnn(n_in, hidden, wt, fused_b, h_off, options.kinds()[0], 0))
    else:
        b.emit(ir.RnnAny(n_in, hidden, wt, fused_b, h_off, options.kinds()[0],
                         b.put(options.block(hidden))))  # fmt: skip
    return hidden, layer


def _other(node: Node, cur: str, consts: dict[str, np.ndarray]) -> tuple[np.ndarray, bool]:
    """The constant operand of a binary node on the data path, and whether it comes first."""
    a, c = node.inputs[0], node.inputs[1]
    other = c if a == cur else a
    if other not in consts:
        raise NoPlan(f"node {node.name!r} ({node.op}) combines the data path with a run-time value")
    return consts[other], a != cur


def _dense(b: _Builder, node: Node, cur: str, consts: dict[str, np.ndarray], n: int,
           producers: dict[str, Node]) -> int:  # fmt: skip
    quantized = int8.dense_weight(node.inputs[1], producers, consts)
    if node.op == "MatMul" and node.inputs[0] == cur and quantized is not None and b.rows == 1:
        return _dense_int8(b, node, quantized, n)
    weight = consts.get(node.inputs[1])
    if node.inputs[0] != cur or weight is None or weight.ndim != 2:
        raise NoPlan(f"node {node.name!r} ({node.op}) is not data @ constant matrix")
    if node.op == "Gemm":
        a = node.attrs
        if a.get("transA", 0):
            raise NoPlan(f"node {node.name!r}: Gemm with transA")
        weight = (weight.T if a.get("transB", 0) else weight) * a.get("alpha", 1.0)
        bias = consts.get(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
        bias = np.zeros(weight.shape[1]) if bias is None else bias * a.get("beta", 1.0)
    else:
        bias = np.zeros(weight.shape[1])
    if weight.shape[0] != n:
        raise NoPlan(f"node {node.name!r}: a {weight.shape} matrix on a data path of width {n}")
    out = weight.shape[1]
    b.width = max(b.width, out * b.rows)
    off_w, off_b = b.put(weight), b.put(np.broadcast_to(bias, (out,)))
    b.emit(ir.Dense(n, out, off_w, off_b) if b.rows == 1 else
           ir.DenseRows(b.rows, n, out, off_w, off_b))  # fmt: skip
    return out


def _dense_int8(b: _Builder, node: Node, weight: int8.Int8Matrix, n: int) -> int:
    """A MatMul whose weight is int8 (its bias, if any, is the Add after it)."""
    if weight.q.shape[0] != n:
        raise NoPlan(f"node {node.name!r}: a {weight.q.shape} matrix on a data path of width {n}")
    out = weight.q.shape[1]
    b.width = max(b.width, out)
    b.emit(ir.DenseQ(n, out, b.put_int8(weight.q), b.put(weight.scale),
                     b.put(np.zeros(out, np.float32))))  # fmt: skip
    return out


def _dynamic_dense(b: _Builder, node: Node, users: dict[str, list[Node]],
                   consts: dict[str, np.ndarray], n: int) -> tuple[int, str]:  # fmt: skip
    """DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul as one int8 dense op (weights
    only: int8_weights.py); (its width, where the data path goes on)."""
    found = int8.dynamic_matmul(node, users, consts)
    if found is None:
        raise NoPlan(f"node {node.name!r} (DynamicQuantizeLinear) does not start an int8 MatMul")
    weight, after = found
    return _dense_int8(b, node, weight, n), after


def _fold_bias_into_dense(b: _Builder, const: np.ndarray, n: int) -> bool:
    """An Add right after a dense layer becomes its bias (no separate affine op)."""
    dense = ir.Dense | ir.DenseQ | ir.DenseRows
    if not b.ops or not isinstance(b.ops[-1], dense) or b.scale is not None:
        return False
    off = b.ops[-1].off_b
    block = next(i for i, p in enumerate(b.params) if sum(x.size for x in b.params[:i]) == off)
    b.params[block] = b.params[block] + np.broadcast_to(np.asarray(const, np.float32).ravel(), (n,))
    return True


def _repeats(node: Node, consts: dict[str, np.ndarray], n: int) -> int:
    """How often an Expand repeats the data path: a seq2seq model feeding its encoder's output
    to the decoder `horizon` times (x.expand(-1, horizon, -1) in PyTorch). One axis may grow;
    every other stays 1 (or -1, or the data path's own width)."""
    shape = consts.get(node.inputs[1]) if len(node.inputs) > 1 else None
    if shape is None:
        raise NoPlan(f"node {node.name!r} (Expand) expands to a shape computed at run time")
    dims = [int(d) for d in np.asarray(shape).ravel()]
    if dims and dims[-1] == n:
        dims = dims[:-1]
    grown = [d for d in dims if d not in (1, -1)]
    if len(grown) != 1 or grown[0] < 1:
        raise NoPlan(f"node {node.name!r} (Expand) to {list(np.asarray(shape).ravel())} is not "
                     "one axis of repeats of the data path")  # fmt: skip
    return grown[0]


def _zeros_each_time(name: str, producers: dict[str, Node], consts: dict[str, np.ndarray]) -> bool:
    """Whether an initial state is zeros for every call: absent, a zero constant, or a
    ConstantOfShape of zeros (sized at run time)."""
    if not name:
        return True
    if name in consts:
        return not np.any(consts[name])
    node = producers.get(name)
    value = node.attrs.get("value") if node is not None else None
    return (
        node is not None
        and node.op == "ConstantOfShape"
        and not np.any(0 if value is None else value)
    )


def _decoder(b: _Builder, node: Node, consts: dict[str, np.ndarray], producers: dict[str, Node],
             n_in: int) -> int:  # fmt: skip
    """The LSTM after an Expand: a seq2seq decoder (program.LstmDecoder), the data path then
    `horizon` rows of its h."""
    names = [*node.inputs, "", "", ""]
    if node.op != "LSTM" or not _options(node, consts).plain("LSTM"):
        raise NoPlan(f"node {node.name!r} ({node.op}) decodes with other than a plain LSTM")
    if not all(_zeros_each_time(name, producers, consts) for name in names[5:7]):
        raise NoPlan(f"node {node.name!r}: a decoder whose initial state is not zeros")
    w, r, bias = _weights(node, consts)
    hid = r.shape[1]
    if w.shape[1] != n_in:
        raise NoPlan(f"node {node.name!r} takes {w.shape[1]} inputs, the data path has {n_in}")
    gates = w.shape[0]
    wt = b.put(np.concatenate([w.T, r.T], axis=0))
    b.emit(ir.LstmDecoder(n_in, hid, wt, b.put(bias[:gates] + bias[gates:]), b.repeat))
    b.width = max(b.width, 10 * hid, b.repeat * hid)
    b.rows, b.repeat = b.repeat, 0
    return hid


LAST = -1  # the index PyTorch's y[:, -1] and hn[-1] export: the newest step, the last layer
LONG = 2**30  # a Slice end at least this big runs to the end of its axis (torch writes 2**63-1)


def _const_ints(node: Node, slot: int, consts: dict[str, np.ndarray]) -> list[int] | None:
    name = node.inputs[slot] if len(node.inputs) > slot else ""
    if name not in consts or consts[name].size > 8:
        return None
    return [int(v) for v in np.asarray(consts[name]).ravel()]


def _takes_last(node: Node, consts: dict[str, np.ndarray]) -> bool:
    """Gather(index -1) or Slice(-1:) of the data path: a many-to-one model's "last step"
    (y[:, -1]) or "last layer's final state" (hn[-1]). Streaming one sample at a time, the
    newest step *is* the one sample, so the op passes the sample's value through; `verify`
    proves that on sequences of two lengths (an index on another axis gives other shapes or
    values there, and the plan is refused)."""
    if node.op == "Gather":
        return _const_ints(node, 1, consts) == [LAST]
    if node.op == "Slice" and len(node.inputs) >= 3:
        starts, ends = _const_ints(node, 1, consts), _const_ints(node, 2, consts)
        steps = _const_ints(node, 4, consts) if len(node.inputs) > 4 and node.inputs[4] else None
        return (
            starts is not None and ends is not None and set(starts) == {LAST}
            and all(e >= LONG for e in ends) and (steps is None or set(steps) == {1})
        )  # fmt: skip
    return False


def _last_of_concat(node: Node, cur: str, users: dict[str, list[Node]],
                    consts: dict[str, np.ndarray]) -> Node | None:  # fmt: skip
    """For Concat([..., cur]) followed only by Gather(-1) on the same axis (the way torch
    exports hn[-1] of a multi-layer RNN: every layer's Y_h stacked, the last one taken), the
    Gather: together they pass cur's value through when cur is one entry thick there."""
    nexts = users.get(node.outputs[0], [])
    if node.inputs[-1] != cur or len(nexts) != 1 or not _takes_last(nexts[0], consts):
        return None
    gather = nexts[0]
    axis = node.attrs.get("axis")
    return gather if gather.op == "Gather" and gather.attrs.get("axis", 0) == axis else None


def _next_output(node: Node, users: dict[str, list[Node]], target: str) -> str:
    """Where the data path leaves a recurrent node: Y (every step's h), or Y_h (the last step's
    h) when only that is used, as in `fc(hn[-1])`. Streaming, both are the sample's new h."""
    y_and_y_h = [name for name in node.outputs[:2] if name]
    if target in y_and_y_h:
        return target
    used = (name for name in y_and_y_h if users.get(name))
    return next(used, node.outputs[0] if node.outputs else "")


def build_plan(graph: Graph, n_features: int, transform: TargetTransform | None = None,
               n_targets: int = 0) -> Plan:  # fmt: skip
    """Follow the data path from the first input to the first output; raise NoPlan off it.

    With a forecast's target transform (the artifact's metadata says which), the network's
    path runs from X_MODEL to Y_MODEL (transform_graph.py), and the transform's cells go
    before and after it; `verify` proves the whole against the graph like any plan."""
    consts = fold_constants(graph)
    # Shape only reads the data path's size (e.g. to build a zero initial state): not a use.
    live = [n for n in graph.nodes
            if n.op != "Shape" and not all(o in consts for o in n.outputs if o)]  # fmt: skip
    users: dict[str, list[Node]] = {}
    for node in live:
        for name in set(node.inputs) - {""}:
            users.setdefault(name, []).append(node)
    producers = {name: node for node in graph.nodes for name in node.outputs if name}
    b, layers = _Builder(width=n_features), []
    cur, n, target = graph.inputs[0], n_features, graph.outputs[0]
    lag: tuple[int, int] | None = None
    if transform is not None:
        if X_MODEL not in users or Y_MODEL not in producers:
            raise NoPlan(f"a target transform without the graph values {X_MODEL!r} and "
                         f"{Y_MODEL!r} around the network")  # fmt: skip
        size = (1 + transform.lag) * n_targets
        lag = (b.own_state(np.zeros(size, np.float32)), size) if transform.lag else None
        b.emit(ir.TransformIn(n_features, n_targets, transform.lag, int(transform.log),
                              lag[0] if lag else 0))  # fmt: skip
        cur, target = X_MODEL, Y_MODEL
    while cur != target:
        nexts = users.get(cur, [])
        if len(nexts) != 1:
            raise NoPlan(f"value {cur!r} feeds {len(nexts)} nodes; a fused plan follows one path")
        node = nexts[0]
        after = node.outputs[0]
        if node.op in GLUE or _takes_last(node, consts):
            pass
        elif node.op == "Concat" and (gather := _last_of_concat(node, cur, users, consts)):
            after = gather.outputs[0]
        elif node.op in ("Add", "Sub", "Mul", "Div"):
            const, first = _other(node, cur, consts)
            if not (node.op == "Add" and _fold_bias_into_dense(b, const, n)):
                _affine(b, node.op, const, first)
        else:
            b.flush_affine(n)
            if node.op in GATES:
                if node.inputs[0] != cur:
                    raise NoPlan(f"node {node.name!r} takes the data path as a weight or state")
                if b.rows > 1:
                    raise NoPlan(f"node {node.name!r} ({node.op}) runs on a decoder's steps")
                if b.repeat:
                    n = _decoder(b, node, consts, producers, n)
                else:
                    n, layer = _recurrent(b, node, consts, n, producers)
                    layers.append(layer)
                after = _next_output(node, users, target)
            elif node.op == "Expand":
                b.repeat = _repeats(node, consts, n)
            elif node.op in ("MatMul", "Gemm"):
                n = _dense(b, node, cur, consts, n, producers)
            elif node.op == "DynamicQuantizeLinear" and b.rows == 1:
                n, after = _dynamic_dense(b, node, users, consts, n)
            elif node.op in ACTIVATIONS:
                alpha = b.put(np.array([node.attrs.get("alpha", 0.01)]))
                b.emit(ir.Act(n * b.rows, ACTIVATIONS[node.op], alpha))
            elif node.op == "Softmax" and node.attrs.get("axis", -1) in (-1, 2) and b.rows == 1:
                b.emit(ir.Softmax(n))
            else:
                raise NoPlan(f"node {node.name!r} ({node.op}) is off the fused plan's patterns")
        cur = after
    b.flush_affine(n)
    if transform is not None:  # on every output: a seq2seq decoder's rows of them too
        b.emit(ir.TransformOut(n * b.rows, n_targets, transform.lag, int(transform.log),
                               int(transform.seasonal), lag[0] if lag else 0))  # fmt: skip
        target = graph.outputs[0]
    if not layers:
        raise NoPlan("the data path has no recurrent layer")
    if b.repeat:
        raise NoPlan("an Expand repeats the data path for no decoder")
    n *= b.rows
    state = np.concatenate(b.state).astype(np.float32)
    return Plan(
        b.ops,
        aligned.copy(np.concatenate(b.params)),
        n_features,
        n,
        aligned.align_up(max(b.width, n)),
        layers,
        state,
        target,
        lag,
    )
