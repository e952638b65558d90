"""int8 models on the fused plan with their weights kept int8 (runtime/int8_weights.py, the *Q
ops of program.py, the int8 cells of cells.py): the answers of the graph they replace, a quarter
of the weight bytes resident."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeseq
from edgeseq.runtime.kernels import program as ir
from edgeseq.runtime.planning.verify import weight_only
from tests.pool_checks import assert_pools_step_as_separate_streams

ROOT = Path(__file__).resolve().parents[2]
FEATURES, HIDDEN, OUTPUTS = 5, 24, 2
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def _relative_gap(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.abs(a - b) / (1.0 + np.abs(b))).max())


def _quantized(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per channel along `axis`: q and the scale per channel."""
    other = tuple(i for i in range(w.ndim) if i != axis)
    scale = (np.abs(w).max(axis=other) / 127.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def _dequantize_linear_graph(op: str) -> onnx.ModelProto:
    """x -> op (W, R from DequantizeLinear of int8, per gate unit) -> Y_h -> MatMul with an
    int8 weight (per output) -> Add bias: what a per-channel weight quantizer writes."""
    rng = np.random.default_rng(11)
    g = GATES[op] * HIDDEN
    inits, nodes = [], []
    for name, shape in (("W", (1, g, FEATURES)), ("R", (1, g, HIDDEN))):
        q, scale = _quantized(0.4 * rng.standard_normal(shape).astype(np.float32), axis=1)
        inits += [numpy_helper.from_array(q, f"{name}_q"),
                  numpy_helper.from_array(scale, f"{name}_s"),
                  numpy_helper.from_array(np.zeros(g, np.int8), f"{name}_z")]  # fmt: skip
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"],
                                      [name], axis=1))  # fmt: skip
    inits.append(numpy_helper.from_array(0.1 * rng.standard_normal((1, 2 * g), np.float32), "B"))
    q, scale = _quantized(0.5 * rng.standard_normal((HIDDEN, OUTPUTS)).astype(np.float32), axis=1)
    inits += [numpy_helper.from_array(q, "Wd_q"), numpy_helper.from_array(scale, "Wd_s"),
              numpy_helper.from_array(np.zeros(OUTPUTS, np.int8), "Wd_z"),
              numpy_helper.from_array(rng.standard_normal(OUTPUTS).astype(np.float32), "bd"),
              numpy_helper.from_array(np.array([1], np.int64), "axes")]  # fmt: skip
    attrs = {"linear_before_reset": 1} if op == "GRU" else {}
    outputs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    nodes += [
        helper.make_node("DequantizeLinear", ["Wd_q", "Wd_s", "Wd_z"], ["Wd"], axis=1),
        helper.make_node(op, ["X", "W", "R", "B"], outputs, hidden_size=HIDDEN, **attrs),
        helper.make_node("Squeeze", ["Y", "axes"], ["s"]),
        helper.make_node("MatMul", ["s", "Wd"], ["m"]),
        helper.make_node("Add", ["m", "bd"], ["out"]),
    ]
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["time", 1, FEATURES])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["time", 1, OUTPUTS])
    graph = helper.make_graph(nodes, "int8", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
def test_dequantize_linear_weights_stay_int8_and_stream_like_onnx_runtime(op, tmp_path):
    path = tmp_path / f"{op.lower()}-int8.onnx"
    onnx.save(_dequantize_linear_graph(op), path)
    model = edgeseq.load(path)
    assert model.plan is not None, model.plan_note
    kinds = [type(o) for o in model.plan.ops]
    assert {ir.RnnQ: "RNN", ir.GruQ: "GRU", ir.LstmQ: "LSTM"}.get(kinds[0]) == op, kinds
    assert kinds[1:] == [ir.DenseQ], kinds  # the head's bias folded into it
    xs = np.random.default_rng(2).standard_normal((300, FEATURES)).astype(np.float32)
    options = ort.SessionOptions()  # as written: ORT's own rewrites would quantize activations
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    (expected,) = ort.InferenceSession(str(path), options).run(None, {"X": xs[:, None, :]})
    expected = expected.reshape(len(xs), OUTPUTS)
    stream = model.stream()
    got = np.stack([stream.step(x) for x in xs])
    assert _relative_gap(got, expected) < 1e-5
    assert _relative_gap(model.stream().feed(xs), expected) < 1e-5


INT8_TWINS = [("pump-lstm-int8", "pump-lstm"), ("pump-gru-int8", "pump-gru")]


@pytest.mark.parametrize(("name", "float_name"), INT8_TWINS)
def test_the_reference_int8_models_run_fused_on_int8_weights(name, float_name):
    model, twin = (
        edgeseq.load(ROOT / "export" / f"{name}.onnx"),
        edgeseq.load(ROOT / "export" / f"{float_name}.onnx"),
    )
    assert model.plan is not None, model.plan_note
    assert model.plan.uses(*ir.INT8)
    assert not model.plan.uses(ir.Lstm, ir.Gru, ir.Rnn, ir.Dense)  # every weight int8
    assert twin.plan is not None
    assert model.plan.params.nbytes < 0.45 * twin.plan.params.nbytes


@pytest.mark.parametrize("name", [name for name, _ in INT8_TWINS])
def test_an_int8_stream_answers_the_graph_with_weights_only_quantized(name):
    """The fused int8 plan against the whole-sequence evaluation of the same graph, the data
    path unquantized (weight_only: the int8 MatMul's activations are not rounded to int8),
    over 1,000 streamed steps; and against ONNX Runtime, which also rounds activations, within
    int8 noise."""
    path = ROOT / "export" / f"{name}.onnx"
    model = edgeseq.load(path)
    xs = np.random.default_rng(4).standard_normal((1000, model.n_features)).astype(np.float32)
    stream = model.stream()
    got = np.stack([stream.step(x) for x in xs])
    feeds = model.inputs.feeds(xs[None])
    whole = weight_only(model.graph).evaluate(feeds)[model.graph.outputs[0]]
    expected = whole.reshape(got.shape)
    assert _relative_gap(got, expected) < 1e-5
    ort_stream = edgeseq.load(path, backend="onnxruntime").stream()
    by_ort = np.stack([ort_stream.step(x) for x in xs[:200]])
    spread = float(np.ptp(by_ort)) + 1e-6
    assert float(np.abs(got[:200] - by_ort).max()) < 0.05 * spread


@pytest.mark.parametrize("name", [name for name, _ in INT8_TWINS])
def test_int8_pools_answer_as_separate_streams_bit_for_bit(name):
    assert_pools_step_as_separate_streams(edgeseq.load(ROOT / "export" / f"{name}.onnx"), seed=5)
