"""NumPy implementations of the non-recurrent ONNX ops edgeseq accepts, by op type.

Each takes the node's attributes and its inputs (None for an omitted optional input) and
returns the list of outputs. Shape glue (Transpose, Slice, Reshape, Shape/Gather arithmetic...)
follows the operator specification; so do the int8 ops that quantized exports use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import helper

from edgeseq.errors import ModelFormatError
from edgeseq.runtime.graphs import recurrent_ops

A = np.ndarray
Attrs = dict[str, Any]


def _axes(attrs: Attrs, given: A | None) -> list[int]:
    if given is not None:
        return [int(a) for a in given]
    return [int(a) for a in attrs.get("axes", [])]


def _constant(attrs: Attrs) -> list[A]:
    for key, dtype in (
        ("value_float", np.float32),
        ("value_floats", np.float32),
        ("value_int", np.int64),
        ("value_ints", np.int64),
    ):
        if key in attrs:
            return [np.asarray(attrs[key], dtype)]
    if "value" not in attrs:
        raise ModelFormatError(f"Constant node with attributes {sorted(attrs)} is not supported")
    return [np.asarray(attrs["value"])]


def _squeeze(attrs: Attrs, x: A, axes: A | None = None) -> list[A]:
    picked = _axes(attrs, axes)
    return [np.squeeze(x, axis=tuple(picked)) if picked else np.squeeze(x)]


def _unsqueeze(attrs: Attrs, x: A, axes: A | None = None) -> list[A]:
    out = x
    rank = x.ndim + len(_axes(attrs, axes))
    for axis in sorted(a % rank for a in _axes(attrs, axes)):
        out = np.expand_dims(out, axis)
    return [out]


def _reshape(attrs: Attrs, x: A, shape: A) -> list[A]:
    target = [int(s) for s in shape]
    if not attrs.get("allowzero", 0):
        target = [x.shape[i] if s == 0 else s for i, s in enumerate(target)]
    return [x.reshape(target)]


def _slice(
    attrs: Attrs, x: A, starts: A, ends: A, axes: A | None = None, steps: A | None = None
) -> list[A]:
    index = [slice(None)] * x.ndim
    axes_list = _axes(attrs, axes) or list(range(len(starts)))
    step_list = [1] * len(starts) if steps is None else [int(s) for s in steps]
    for axis, start, end, step in zip(axes_list, starts, ends, step_list, strict=True):
        size = x.shape[axis]
        start, end = int(max(min(start, size), -size - 1)), int(max(min(end, size), -size - 1))
        index[axis] = slice(start, end if not (step < 0 and end < -size) else None, step)
    return [x[tuple(index)]]


def _gemm(attrs: Attrs, a: A, b: A, c: A | None = None) -> list[A]:
    a = a.T if attrs.get("transA", 0) else a
    b = b.T if attrs.get("transB", 0) else b
    out = attrs.get("alpha", 1.0) * (a @ b)
    if c is not None:
        out = out + attrs.get("beta", 1.0) * c
    return [out.astype(np.float32)]


def _dequantize(attrs: Attrs, x: A, scale: A, zero: A | None = None) -> list[A]:
    axis = attrs.get("axis", 1)
    shape = [1] * x.ndim
    if scale.ndim == 1 and scale.size > 1:
        shape[axis % x.ndim] = -1
    zp = np.zeros(1, np.int32) if zero is None else zero.astype(np.int32).reshape(shape)
    return [((x.astype(np.int32) - zp) * scale.reshape(shape)).astype(np.float32)]


def _dynamic_quantize(attrs: Attrs, x: A) -> list[A]:
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = np.float32((hi - lo) / 255.0) if hi > lo else np.float32(1.0)
    zero = np.uint8(np.clip(np.rint(-lo / scale), 0, 255))
    y = np.clip(np.rint(x / scale) + zero, 0, 255).astype(np.uint8)
    return [y, np.asarray(scale, np.float32), np.asarray(zero, np.uint8)]


def _matmul_integer(
    attrs: Attrs, a: A, b: A, a_zero: A | None = None, b_zero: A | None = None
) -> list[A]:
    if a.dtype.kind == "f":  # verify.weight_only: the data path unquantized, weights dequantized
        a_f = a - (0 if a_zero is None else a_zero.astype(np.float32))
        b_f = b.astype(np.float32) - (0 if b_zero is None else b_zero.astype(np.float32))
        return [np.matmul(a_f, b_f).astype(np.float32)]
    a32 = a.astype(np.int32) - (0 if a_zero is None else a_zero.astype(np.int32))
    b32 = b.astype(np.int32) - (0 if b_zero is None else b_zero.astype(np.int32))
    return [np.matmul(a32, b32).astype(np.int32)]


def _dynamic_quantize_lstm(
    attrs: Attrs,
    x: A,
    w: A,
    r: A,
    b: A | None = None,
    seq: A | None = None,
    h0: A | None = None,
    c0: A | None = None,
    p: A | None = None,
    w_scale: A | None = None,
    w_zero: A | None = None,
    r_scale: A | None = None,
    r_zero: A | None = None,
) -> list[A]:
    """ONNX Runtime's int8 LSTM (com.microsoft): weights stored [dirs, in, 4H], dequantized here
    and run in float32 (ORT also quantizes activations, so results differ by int8 noise)."""

    def weights(q: A, scale: A | None, zero: A | None) -> A:
        """(q - zero) * scale, [dirs, in, 4H] -> [dirs, 4H, in]: a scale and zero point per
        direction and gate unit ([dirs, 4H]), checked first (a broadcast of other shapes once
        asked for 16 GiB)."""
        expected = (q.shape[0], q.shape[2]) if q.ndim == 3 else None
        for name, value in (("scale", scale), ("zero point", zero)):
            if value is not None and (expected is None or value.shape != expected):
                raise ValueError(f"a weight's {name} has shape {value.shape}; expected "
                                 f"[directions, 4 * hidden_size] = {list(expected or ())} for "
                                 f"weights of shape {list(q.shape)}")  # fmt: skip
        if scale is None:
            raise ValueError("a quantized weight has no scale")
        zp = 0 if zero is None else zero.astype(np.int32)[:, None, :]
        return np.transpose((q.astype(np.int32) - zp) * scale[:, None, :], (0, 2, 1)).astype(
            np.float32
        )

    keys = (
        "hidden_size",
        "direction",
        "activations",
        "activation_alpha",
        "activation_beta",
        "clip",
        "input_forget",
    )
    kw = {k: attrs[k] for k in keys if k in attrs}
    return list(
        recurrent_ops.lstm(
            x, weights(w, w_scale, w_zero), weights(r, r_scale, r_zero), b, seq, h0, c0, p, **kw
        )
    )


def _softmax(attrs: Attrs, x: A) -> list[A]:
    axis = attrs.get("axis", -1)
    if attrs.get("flatten_from_axis"):  # opset < 13: over every axis from `axis` on
        axis = axis % max(x.ndim, 1)
        flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
        return [_softmax({"axis": 1}, flat)[0].reshape(x.shape)]
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return [(e / e.sum(axis=axis, keepdims=True)).astype(x.dtype)]


def _f32(fn: Any) -> Any:
    return lambda attrs, *xs: [np.asarray(fn(*xs), dtype=np.result_type(*xs))]


def _shape(attrs: Attrs, x: A) -> list[A]:
    return [np.asarray(x.shape, np.int64)[attrs.get("start", 0) : attrs.get("end")]]


def _expand(attrs: Attrs, x: A, shape: A) -> list[A]:
    target = np.broadcast_shapes(x.shape, tuple(int(v) for v in shape))
    return [np.broadcast_to(x, target).copy()]


def _constant_of_shape(attrs: Attrs, shape: A) -> list[A]:
    value = np.asarray(attrs.get("value", np.zeros(1, np.float32))).ravel()
    return [np.full(tuple(int(v) for v in shape), value[0], dtype=value.dtype)]


def _leaky_relu(attrs: Attrs, x: A) -> list[A]:
    return [np.where(x >= 0, x, attrs.get("alpha", 0.01) * x).astype(x.dtype)]


def _div(attrs: Attrs, a: A, b: A) -> list[A]:
    return [np.asarray(a / b if a.dtype.kind == "f" else a // b, a.dtype)]


OPS: dict[str, Any] = {
    "Identity": lambda attrs, x: [x],
    "Cast": lambda attrs, x: [x.astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))],
    "Constant": lambda attrs: _constant(attrs),
    "Transpose": lambda attrs, x: [np.transpose(x, attrs.get("perm"))],
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Reshape": _reshape,
    "Slice": _slice,
    "Concat": lambda attrs, *xs: [np.concatenate(xs, axis=attrs["axis"])],
    "Shape": _shape,
    "Gather": lambda attrs, x, i: [np.take(x, i.astype(np.int64), axis=attrs.get("axis", 0))],
    "Expand": _expand,
    "ConstantOfShape": _constant_of_shape,
    "Equal": lambda attrs, a, b: [np.equal(a, b)],
    "Where": lambda attrs, c, a, b: [np.where(c, a, b)],
    "Add": _f32(np.add),
    "Sub": _f32(np.subtract),
    "Mul": _f32(np.multiply),
    "Div": _div,
    "Relu": lambda attrs, x: [np.maximum(x, 0).astype(x.dtype)],
    "Tanh": lambda attrs, x: [np.tanh(x)],
    "Log": lambda attrs, x: [np.log(x)],  # a forecast's log target transform
    "Exp": lambda attrs, x: [np.exp(x)],
    "Sigmoid": lambda attrs, x: [(1 / (1 + np.exp(-x))).astype(x.dtype)],
    "LeakyRelu": _leaky_relu,
    "Softmax": _softmax,
    "MatMul": lambda attrs, a, b: [np.matmul(a, b)],
    "Gemm": _gemm,
    "DequantizeLinear": _dequantize,
    "DynamicQuantizeLinear": _dynamic_quantize,
    "MatMulInteger": _matmul_integer,
    "DynamicQuantizeLSTM": _dynamic_quantize_lstm,
}
