"""Where a graph's weights are int8, in the layout the int8 cells read (cells.py, program.py).

Quantized exports store a weight as int8 values with a scale (and zero point) per output
channel or per tensor. Three forms reach edgeseq:
- ONNX Runtime's `DynamicQuantizeLSTM` (what `--quantize int8` makes of an LSTM): W [dirs, in,
  4H] and R [dirs, H, 4H], already input-major, scales and zero points [dirs, 4H];
- a `DequantizeLinear` of an int8 initializer feeding a GRU/RNN/LSTM's W or R ([dirs, G, in],
  a scale per gate unit along axis 1, or one per tensor) or a MatMul's weight ([in, out], a
  scale per output along axis 1, or one per tensor);
- a MatMul quantized on both sides (`DynamicQuantizeLinear` of the data path, `MatMulInteger`
  with int8 weights, `Cast`, `Mul` by the product of the two scales), as ONNX Runtime's
  dynamic quantization writes a linear head.

Each becomes int8 Q (inputs, outputs) and a float32 scale per output, so W = Q * scale. Zero
points are folded into Q where q - zero still fits in int8 (symmetric quantization, ONNX
Runtime's default for weights, has zero points of 0); otherwise None: the caller keeps the
float weights. In the third form the data path is not quantized in edgeseq's kernels (weights
only), so they answer the graph with its activations unquantized (verify.py checks them so).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeseq.runtime.graphs.graph import Node

Consts = dict[str, np.ndarray]


@dataclass(frozen=True)
class Int8Matrix:
    q: np.ndarray  # int8 (inputs, outputs), row-major as the kernels read it
    scale: np.ndarray  # float32 (outputs,)


def _shifted(q: np.ndarray, zero: np.ndarray | int) -> np.ndarray | None:
    """q - zero as int8, or None where that leaves int8's range."""
    values = q.astype(np.int32) - (np.asarray(zero).astype(np.int32))
    if values.size and (values.min() < -128 or values.max() > 127):
        return None
    return values.astype(np.int8)


def _per_output(scale: np.ndarray, outputs: int) -> np.ndarray | None:
    """A scale per output (or one for all), as (outputs,) float32; None for another layout."""
    flat = np.asarray(scale, np.float32).ravel()
    if flat.size == 1:
        return np.full(outputs, flat[0], np.float32)
    return flat.copy() if flat.size == outputs else None


Dequantized = tuple[np.ndarray, np.ndarray, np.ndarray | int, int]  # values, scale, zero, axis


def dequantized(name: str, producers: dict[str, Node], consts: Consts) -> Dequantized | None:
    """(int8 values, scale, zero point, axis) of a constant that DequantizeLinear makes from an
    int8 initializer, else None."""
    node = producers.get(name)
    if node is None or node.op != "DequantizeLinear":
        return None
    q = consts.get(node.inputs[0])
    scale = consts.get(node.inputs[1]) if len(node.inputs) > 1 else None
    has_zero = len(node.inputs) > 2 and node.inputs[2]
    zero = consts.get(node.inputs[2]) if has_zero else 0
    if q is None or q.dtype != np.int8 or scale is None or zero is None:
        return None
    axis = int(node.attrs.get("axis", 1))
    return q, scale, zero, axis + q.ndim if axis < 0 else axis


def recurrent_weight(name: str, producers: dict[str, Node], consts: Consts) -> Int8Matrix | None:
    """A GRU/RNN/LSTM's W or R ([1, G, inputs]) made by DequantizeLinear, as Q (inputs, G)."""
    found = dequantized(name, producers, consts)
    if found is None:
        return None
    q, scale, zero, axis = found
    if q.ndim != 3 or q.shape[0] != 1 or (np.asarray(scale).size > 1 and axis != 1):
        return None
    zero_col = np.asarray(zero).reshape(-1, 1) if np.asarray(zero).size > 1 else zero
    shifted = _shifted(q[0], zero_col)
    per_unit = _per_output(scale, q.shape[1])
    if shifted is None or per_unit is None:
        return None
    return Int8Matrix(np.ascontiguousarray(shifted.T), per_unit)


def dense_weight(name: str, producers: dict[str, Node], consts: Consts) -> Int8Matrix | None:
    """A MatMul's weight ([inputs, outputs]) made by DequantizeLinear, as Q and a scale each."""
    found = dequantized(name, producers, consts)
    if found is None:
        return None
    q, scale, zero, axis = found
    if q.ndim != 2 or (np.asarray(scale).size > 1 and axis != 1):
        return None
    shifted = _shifted(q, np.asarray(zero).reshape(1, -1) if np.asarray(zero).size > 1 else zero)
    per_output = _per_output(scale, q.shape[1])
    if shifted is None or per_output is None:
        return None
    return Int8Matrix(np.ascontiguousarray(shifted), per_output)


def dynamic_lstm_weights(node: Node, consts: Consts) -> tuple[Int8Matrix, Int8Matrix] | None:
    """W and R of a DynamicQuantizeLSTM ([1, inputs, 4H] int8, scales and zeros [1, 4H])."""
    names = list(node.inputs) + [""] * (12 - len(node.inputs))
    found = []
    for weight, scale, zero in ((names[1], names[8], names[9]), (names[2], names[10], names[11])):
        q, s = consts.get(weight), consts.get(scale)
        z = consts.get(zero) if zero else np.zeros(1, np.int8)
        if q is None or s is None or z is None or q.dtype != np.int8 or q.ndim != 3:
            return None
        shifted = _shifted(q[0], np.asarray(z).reshape(1, -1) if z.size > 1 else z)
        per_unit = _per_output(s, q.shape[2])
        if shifted is None or per_unit is None:
            return None
        found.append(Int8Matrix(np.ascontiguousarray(shifted), per_unit))
    return found[0], found[1]


def dynamic_matmul(
    node: Node, users: dict[str, list[Node]], consts: Consts
) -> tuple[Int8Matrix, str] | None:
    """For DynamicQuantizeLinear(x) -> MatMulInteger(., Wq) -> Cast -> Mul(., x_scale * w_scale):
    Wq and its scale, and the name of the Mul's output (where the data path goes on); else
    None."""

    def only_user(name: str, op: str) -> Node | None:
        found = users.get(name, [])
        return found[0] if len(found) == 1 and found[0].op == op else None

    yq, ys, yzero = [*node.outputs, "", "", ""][:3]
    matmul = only_user(yq, "MatMulInteger")
    if matmul is None or matmul.inputs[0] != yq:
        return None
    if len(matmul.inputs) > 2 and matmul.inputs[2] not in ("", yzero):
        return None  # another zero point than the data path's own
    cast = only_user(matmul.outputs[0], "Cast")
    mul = only_user(cast.outputs[0], "Mul") if cast is not None else None
    scales = only_user(ys, "Mul")
    if mul is None or scales is None or scales.outputs[0] not in mul.inputs:
        return None
    w_scale = consts.get(next((i for i in scales.inputs if i != ys), ""))
    q = consts.get(matmul.inputs[1])
    has_zero = len(matmul.inputs) > 3 and matmul.inputs[3]
    zero = consts.get(matmul.inputs[3]) if has_zero else np.zeros(1, np.int8)
    if w_scale is None or q is None or zero is None or q.dtype != np.int8 or q.ndim != 2:
        return None
    shifted = _shifted(q, zero.reshape(1, -1) if zero.size > 1 else zero)
    per_output = _per_output(w_scale, q.shape[1])
    if shifted is None or per_output is None:
        return None
    return Int8Matrix(np.ascontiguousarray(shifted), per_output), mul.outputs[0]
