"""A plan's program: one typed op per step of the data path, and the one place that knows how
an op is laid out as a row of int64s.

The Numba kernels cannot take Python objects, so a program runs as `code`: one row of
CODE_WIDTH int64s per op, the opcode first, then the op's fields in the order they are declared
here. That order is the order of the arguments of the op's function in cells.py after the
arrays, and the fields carry the same names (a test holds the two together), so the interpreter
(interpreter.py) passes row[1], row[2], ... straight through, and the per-model kernels
(specialize.py) write the same values as literals. Everything else (plan.py building, gemm.py's
batched path, the benchmarks' C twin of the step) reads an op by its fields' names.

Offsets (`off_*`) index the plan's flat float32 parameters; `off_h`/`off_c` index a stream's
flat state vector; sizes are counts of floats. The int8 ops' weights (`off_*q`) are int8 blocks
packed four to a float32 slot of the same parameters, their per-output-channel scales float32
(`off_*s`): a weight is q * scale, and the matrix-vector products convert q as they go, so the
weights stay int8 in memory (4x fewer bytes resident and read per sample than float32).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import ClassVar

import numpy as np

CODE_WIDTH = 12
OP_AFFINE, OP_RNN, OP_LSTM, OP_GRU, OP_DENSE, OP_ACT, OP_SOFTMAX = range(7)
# Cells with clip, any activations, peepholes: only the per-model kernels (specialize.py) run
# them; in the interpreter, which every model compiles, they tripled the compile time.
OP_RNN_ANY, OP_LSTM_ANY, OP_GRU_ANY = range(7, 10)
# int8 weights with per-channel scales: also only in the per-model kernels.
OP_RNN_Q, OP_LSTM_Q, OP_GRU_Q, OP_DENSE_Q = range(10, 14)
# seq2seq: a decoder that re-reads the encoder's output `horizon` times, and a dense layer
# applied to each of its steps; also only in the per-model kernels.
OP_LSTM_DECODER, OP_DENSE_ROWS = 14, 15
# a forecast's target transform before and after the network; also only in the per-model kernels
OP_TRANSFORM_IN, OP_TRANSFORM_OUT = 16, 17


@dataclasses.dataclass(frozen=True)
class Op:
    """One step of the data path: its cell in cells.py, its fields in that cell's order."""

    OPCODE: ClassVar[int]
    CELL: ClassVar[str]  # the function in cells.py
    STATEFUL: ClassVar[bool] = False  # the cell takes the stream's state and gate scratch
    # the cell's arrays, when not (p, src, dst[, state, g]), as the generated kernel names
    # them: "x" the sample, "src"/"dst" the data path in and out, "state" the stream's state
    ARRAYS: ClassVar[tuple[str, ...]] = ()

    def values(self) -> tuple[int, ...]:
        return tuple(int(getattr(self, f.name)) for f in dataclasses.fields(self))

    def row(self) -> list[int]:
        values = [self.OPCODE, *self.values()]
        return values + [0] * (CODE_WIDTH - len(values))

    @property
    def width(self) -> int:
        """How many values the op leaves for the next one."""
        return self.values()[0]


@dataclasses.dataclass(frozen=True)
class Recurrent(Op):
    """A recurrent layer: n_in inputs, hid units; its new h is the next op's input."""

    STATEFUL: ClassVar[bool] = True
    n_in: int
    hid: int

    @property
    def width(self) -> int:
        return self.hid


@dataclasses.dataclass(frozen=True)
class Rnn(Recurrent):
    """h = act([x, h] @ [W; R]^T + b): off_wt the stacked weights, off_b Wb + Rb."""

    OPCODE: ClassVar[int] = OP_RNN
    CELL: ClassVar[str] = "rnn"
    off_wt: int
    off_b: int
    off_h: int
    act: int
    off_alpha: int


@dataclasses.dataclass(frozen=True)
class Lstm(Recurrent):
    """ONNX's LSTM (gates i, o, f, c) with the default activations."""

    OPCODE: ClassVar[int] = OP_LSTM
    CELL: ClassVar[str] = "lstm"
    off_wt: int
    off_b: int
    off_h: int
    off_c: int


@dataclasses.dataclass(frozen=True)
class Gru(Recurrent):
    """ONNX's GRU (gates z, r, h): x and h weights apart, as linear_before_reset needs."""

    OPCODE: ClassVar[int] = OP_GRU
    CELL: ClassVar[str] = "gru"
    off_wx: int
    off_rh: int
    off_wb: int
    off_rb: int
    off_h: int
    lbr: int  # linear_before_reset


@dataclasses.dataclass(frozen=True)
class RnnAny(Recurrent):
    """Rnn with clip and any activation; off_opt: clip, alpha, beta."""

    OPCODE: ClassVar[int] = OP_RNN_ANY
    CELL: ClassVar[str] = "rnn_any"
    off_wt: int
    off_b: int
    off_h: int
    kind: int
    off_opt: int


@dataclasses.dataclass(frozen=True)
class LstmAny(Recurrent):
    """Lstm with clip, activations f, g, h, peepholes and input_forget; off_opt: clip, each
    activation's alpha and beta, then the peepholes (i, o, f)."""

    OPCODE: ClassVar[int] = OP_LSTM_ANY
    CELL: ClassVar[str] = "lstm_any"
    off_wt: int
    off_b: int
    off_h: int
    off_c: int
    off_opt: int
    kf: int
    kg: int
    kh: int
    input_forget: int


@dataclasses.dataclass(frozen=True)
class GruAny(Recurrent):
    """Gru with clip and activations f (z, r) and g (the candidate)."""

    OPCODE: ClassVar[int] = OP_GRU_ANY
    CELL: ClassVar[str] = "gru_any"
    off_wx: int
    off_rh: int
    off_wb: int
    off_rb: int
    off_h: int
    lbr: int
    off_opt: int
    kf: int
    kg: int


@dataclasses.dataclass(frozen=True)
class RnnQ(Recurrent):
    """Rnn with int8 W (I, H) at off_wq and R (H, H) at off_rq, scales per unit."""

    OPCODE: ClassVar[int] = OP_RNN_Q
    CELL: ClassVar[str] = "rnn_q"
    off_wq: int
    off_rq: int
    off_ws: int
    off_rs: int
    off_b: int
    off_h: int
    act: int
    off_alpha: int


@dataclasses.dataclass(frozen=True)
class LstmQ(Recurrent):
    """Lstm with int8 W (I, 4H) at off_wq and R (H, 4H) at off_rq, scales per gate unit."""

    OPCODE: ClassVar[int] = OP_LSTM_Q
    CELL: ClassVar[str] = "lstm_q"
    off_wq: int
    off_rq: int
    off_ws: int
    off_rs: int
    off_b: int
    off_h: int
    off_c: int


@dataclasses.dataclass(frozen=True)
class GruQ(Recurrent):
    """Gru (linear_before_reset=1) with int8 W (I, 3H) at off_wq and R (H, 3H) at off_rq."""

    OPCODE: ClassVar[int] = OP_GRU_Q
    CELL: ClassVar[str] = "gru_q"
    off_wq: int
    off_rq: int
    off_ws: int
    off_rs: int
    off_wb: int
    off_rb: int
    off_h: int


@dataclasses.dataclass(frozen=True)
class LstmDecoder(Recurrent):
    """A seq2seq decoder: an LSTM that starts from zeros for every sample and reads the same
    input `horizon` times. Its h at each of those steps, (horizon, hid), goes on row by row;
    it keeps no state between samples. The input's share of the gates is computed once."""

    OPCODE: ClassVar[int] = OP_LSTM_DECODER
    CELL: ClassVar[str] = "lstm_decoder"
    off_wt: int
    off_b: int
    horizon: int

    @property
    def width(self) -> int:
        return self.horizon * self.hid


@dataclasses.dataclass(frozen=True)
class DenseRows(Op):
    """Dense applied to each of `rows` rows of n_in values (a decoder's steps)."""

    OPCODE: ClassVar[int] = OP_DENSE_ROWS
    CELL: ClassVar[str] = "dense_rows"
    rows: int
    n_in: int
    n_out: int
    off_w: int
    off_b: int

    @property
    def width(self) -> int:
        return self.rows * self.n_out


@dataclasses.dataclass(frozen=True)
class Dense(Op):
    """y = x @ W + b: W [n_in, n_out] at off_w."""

    OPCODE: ClassVar[int] = OP_DENSE
    CELL: ClassVar[str] = "dense"
    n_in: int
    n_out: int
    off_w: int
    off_b: int

    @property
    def width(self) -> int:
        return self.n_out


@dataclasses.dataclass(frozen=True)
class DenseQ(Op):
    """Dense with int8 W (n_in, n_out) at off_wq, a scale per output at off_s."""

    OPCODE: ClassVar[int] = OP_DENSE_Q
    CELL: ClassVar[str] = "dense_q"
    n_in: int
    n_out: int
    off_wq: int
    off_s: int
    off_b: int

    @property
    def width(self) -> int:
        return self.n_out


@dataclasses.dataclass(frozen=True)
class Affine(Op):
    """y = x * scale + shift, elementwise (the data path's folded Add/Sub/Mul/Div)."""

    OPCODE: ClassVar[int] = OP_AFFINE
    CELL: ClassVar[str] = "affine"
    n: int
    off_scale: int
    off_shift: int


@dataclasses.dataclass(frozen=True)
class Act(Op):
    """An activation (cells.ACT_*), alpha at off_alpha for those that take one."""

    OPCODE: ClassVar[int] = OP_ACT
    CELL: ClassVar[str] = "act"
    n: int
    kind: int
    off_alpha: int


@dataclasses.dataclass(frozen=True)
class Softmax(Op):
    OPCODE: ClassVar[int] = OP_SOFTMAX
    CELL: ClassVar[str] = "softmax"
    n: int


@dataclasses.dataclass(frozen=True)
class TransformIn(Op):
    """A forecast's target transform before the network (spec.TargetTransform): the first n_t
    of the sample's n_in values become their change since `lag` samples back (the log of the
    ratio when log=1), or their log when there is no lag. The past lives in the stream's state
    at off_lag, [1 + lag, n_t]: a row of "seen" flags (0 on a fresh stream, whose first sample
    then primes the past), then the last `lag` values, oldest first."""

    OPCODE: ClassVar[int] = OP_TRANSFORM_IN
    CELL: ClassVar[str] = "transform_in"
    STATEFUL: ClassVar[bool] = True
    ARRAYS: ClassVar[tuple[str, ...]] = ("src", "dst", "state")
    n_in: int
    n_t: int
    lag: int
    log: int
    off_lag: int


@dataclasses.dataclass(frozen=True)
class TransformOut(Op):
    """The target transform after the network: its n_out = horizon * n_t outputs back to
    physical forecasts, base + out (base * exp(out) when log=1), the base for step t + k being
    the sample's value (diff) or the value at t + k - lag (seasonal=1); exp(out) or out without
    a lag. Then the past (TransformIn's) moves on by the sample."""

    OPCODE: ClassVar[int] = OP_TRANSFORM_OUT
    CELL: ClassVar[str] = "transform_out"
    STATEFUL: ClassVar[bool] = True
    ARRAYS: ClassVar[tuple[str, ...]] = ("x", "src", "dst", "state")
    n_out: int
    n_t: int
    lag: int
    log: int
    seasonal: int
    off_lag: int


KINDS: tuple[type[Op], ...] = (Rnn, Lstm, Gru, RnnAny, LstmAny, GruAny, RnnQ, LstmQ, GruQ,
                               LstmDecoder, Dense, DenseQ, DenseRows, Affine, Act,
                               Softmax, TransformIn, TransformOut)  # fmt: skip
OPS: dict[int, type[Op]] = {cls.OPCODE: cls for cls in KINDS}
ANY_CELLS = (RnnAny, LstmAny, GruAny)  # the ONNX operators' every option
INT8 = (RnnQ, LstmQ, GruQ, DenseQ)
SEQ2SEQ = (LstmDecoder, DenseRows)
TRANSFORMS = (TransformIn, TransformOut)
OWN_KERNEL_ONLY = (*ANY_CELLS, *INT8, *SEQ2SEQ, *TRANSFORMS)  # only the per-model kernels


def c_header() -> str:
    """The layout as C #defines, for benchmarks/step.c (the C twin of the plain cells): each
    opcode as OP_<KIND>, each field's index in a row as <KIND>_<FIELD>, and CODE_WIDTH."""
    lines = ["/* Generated from edgeseq/runtime/kernels/program.py; do not edit. */",
             f"#define CODE_WIDTH {CODE_WIDTH}"]  # fmt: skip
    for kind in KINDS:
        name = kind.__name__.upper()
        lines.append(f"#define OP_{name} {kind.OPCODE}")
        lines += [f"#define {name}_{f.name.upper()} {i}"
                  for i, f in enumerate(dataclasses.fields(kind), 1)]  # fmt: skip
    return "\n".join(lines) + "\n"


def encode(ops: Iterable[Op]) -> np.ndarray:
    """The program as the kernels read it: (ops, CODE_WIDTH) int64."""
    return np.array([op.row() for op in ops], np.int64).reshape(-1, CODE_WIDTH)


def decode(row: Sequence[int] | np.ndarray) -> Op:
    """One code row back into its op."""
    cls = OPS[int(row[0])]
    count = len(dataclasses.fields(cls))
    return cls(*(int(v) for v in row[1 : 1 + count]))
