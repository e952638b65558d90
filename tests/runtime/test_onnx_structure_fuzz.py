"""`edgeseq.load` on structure-fuzzed ONNX files (tests/onnx_structure_fuzz.py): every file
loads or is refused with an EdgeseqError; no other exception, no crash, no hang.

A graph input that declared 2^40 features made `load` allocate terabytes (MemoryError, 92 of
20,000 fuzzed files); the hostile shapes the fuzzer found are pinned below as plain tests, each
refused with a ModelFormatError that names the value and the limit. Each fuzz run is seeded: a
failure names its seed and index, and `python -m tests.onnx_structure_fuzz write SEED INDEX
out.onnx` writes that file again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import edgeseq
from edgeseq.errors import ModelFormatError
from edgeseq.runtime.graphs.graph import LOAD_LIMITS
from tests.onnx_structure_fuzz import FAILURES, STRUCTURAL, Report, run

SEED = 20_261_207
FILES = 6_000  # make test: ~12 s on 2 quiet cores (and the workers' start: ~1 s, or a minute
# of compiling on a cold Numba cache)
SLOW_FILES = 200_000  # make bench: ~7 minutes
REFERENCE = Path(__file__).resolve().parents[2] / "export" / "pump-lstm.onnx"


def assert_clean(report: Report) -> None:
    """No failure; and a run that exercised something: every mutation kind applied, files that
    still load (mutations that keep a model valid) and files refused for many reasons."""
    print(report.summary())
    shown = "\n".join(str(f) for f in report.failures[:20])
    assert not any(report.outcomes[k] for k in FAILURES), f"{report.summary()}\n{shown}"
    assert sum(report.outcomes.values()) == report.files
    assert set(STRUCTURAL) | {"truncate", "flip", "splice"} <= set(report.kinds)
    assert report.outcomes["loaded"] > report.files // 50, report.summary()
    assert report.outcomes["refused"] > report.files // 2, report.summary()


@pytest.mark.timeout(300)
def test_fuzzed_onnx_files_load_or_are_refused_with_an_edgeseq_error() -> None:
    assert_clean(run(SEED, FILES))


@pytest.mark.slow
@pytest.mark.timeout(6 * 3600)
def test_200000_fuzzed_onnx_files_load_or_are_refused_with_an_edgeseq_error() -> None:
    assert_clean(run(SEED + 1, SLOW_FILES))


@pytest.mark.timeout(300)
def test_the_harness_counts_a_crash_a_hang_and_a_stray_exception_and_goes_on() -> None:
    """The fuzzer's verdict is only worth something if it sees failures: workers planted to
    abort, sleep past the limit and raise ValueError at files 2, 5 and 7 are counted as such,
    replaced, and every other file is still loaded."""
    report = run(SEED, 12, workers=2, time_limit=5.0, plant="crash:2,hang:5,raise:7")
    failed = {f["index"]: f["outcome"] for f in report.failures}
    assert failed == {2: "crash", 5: "hang", 7: "raised"}, report.failures
    assert report.restarts == 2
    assert report.outcomes["loaded"] + report.outcomes["refused"] == 9


# -- what the fuzzer found, pinned --------------------------------------------------------------


def _reference() -> onnx.ModelProto:
    return onnx.load(REFERENCE)


def _save(model: onnx.ModelProto, tmp_path: Path) -> Path:
    path = tmp_path / "hostile.onnx"
    onnx.save(model, path)
    return path


def _input(model: onnx.ModelProto, name: str) -> onnx.ValueInfoProto:
    return next(i for i in model.graph.input if i.name == name)


def _set_dim(model: onnx.ModelProto, name: str, axis: int, size: int) -> None:
    dim = _input(model, name).type.tensor_type.shape.dim[axis]
    dim.ClearField("dim_param")
    dim.dim_value = size


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_an_initial_state_that_declares_2_to_the_40_values_is_refused(backend, tmp_path) -> None:
    model = _reference()
    _set_dim(model, "h0", 2, 2**40)
    with pytest.raises(ModelFormatError, match=r"input 'h0' declares dims .*1099511627776"):
        edgeseq.load(_save(model, tmp_path), backend=backend)


@pytest.mark.parametrize("size", [2**40, -1])
def test_x_that_declares_an_absurd_or_negative_batch_is_refused(size, tmp_path) -> None:
    model = _reference()
    _set_dim(model, "x", 0, size)
    with pytest.raises(ModelFormatError, match=r"input 'x' declares dims"):
        edgeseq.load(_save(model, tmp_path))


def test_x_that_declares_2_to_the_40_features_is_refused(tmp_path) -> None:
    model = _reference()
    _set_dim(model, "x", 2, 2**40)
    with pytest.raises(ModelFormatError, match=r"declares 1099511627776 features; at most"):
        edgeseq.load(_save(model, tmp_path))


def test_a_fixed_time_axis_of_2_to_the_20_steps_is_refused_not_run(tmp_path) -> None:
    """Loading runs the graph once at its fixed length: a million steps of recurrence would
    take minutes, so the node is refused before it runs."""
    model = _reference()
    _set_dim(model, "x", 1, 2**20)
    with pytest.raises(ModelFormatError, match=r"would compute 1048576 time steps"):
        edgeseq.load(_save(model, tmp_path), backend="numpy")


def _expanded(shape: list[int]) -> onnx.ModelProto:
    """pump-lstm with its y passed through Expand(y, shape) before the output."""
    model = _reference()
    y = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{o}_pre" if o == y else o for o in node.output]
    model.graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), "shape"))
    model.graph.node.append(helper.make_node("Expand", [f"{y}_pre", "shape"], [y], "boom"))
    del model.graph.output[0].type.tensor_type.shape.dim[:]
    return model


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_an_expand_to_2_to_the_60_values_is_refused_before_it_allocates(backend, tmp_path):
    model = _expanded([2**20, 2**20, 2**20])
    with pytest.raises(ModelFormatError, match=r"node 'boom' \(Expand\) would compute "
                       r"1152921504606846976 values in one output"):  # fmt: skip
        edgeseq.load(_save(model, tmp_path), backend=backend)


def test_a_modest_expand_loads_and_runs_past_the_load_limits(tmp_path) -> None:
    """The limits hold while loading only: a run's sizes are the caller's data."""
    model = edgeseq.load(_save(_expanded([2**14, 1, 1, 1]), tmp_path), backend="numpy")
    x = np.zeros((1, 1100, model.n_features), np.float32)
    y = model.run({"x": x})[model.graph.outputs[0]]
    assert y.shape[:3] == (2**14, 1, 1100) and y.size > LOAD_LIMITS.values


def test_a_constant_of_shape_of_2_to_the_62_values_is_refused(tmp_path) -> None:
    model = _reference()
    big = numpy_helper.from_array(np.array([2**31, 2**31], np.int64), "big")
    model.graph.initializer.append(big)
    model.graph.node.append(helper.make_node("ConstantOfShape", ["big"], ["huge"], "fill"))
    model.graph.output.append(
        helper.make_tensor_value_info("huge", onnx.TensorProto.FLOAT, ["a", "b"])
    )
    with pytest.raises(ModelFormatError, match=r"node 'fill' \(ConstantOfShape\) would compute"):
        edgeseq.load(_save(model, tmp_path))


def _int8_lstm(change) -> onnx.ModelProto:
    """pump-lstm-int8 (ONNX Runtime's com.microsoft DynamicQuantizeLSTM: no ONNX schema, so
    the checker cannot count its inputs and outputs) with its first LSTM node changed."""
    model = onnx.load(REFERENCE.with_name("pump-lstm-int8.onnx"))
    change(next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM"))
    return model


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_a_node_that_names_more_outputs_than_its_op_produces_is_refused(backend, tmp_path):
    """A stream reads each layer's state from the outputs it names: a fourth one was a
    KeyError at the first step."""
    model = _int8_lstm(lambda node: node.output.append("ghost"))
    with pytest.raises(ModelFormatError, match=r"names 4 outputs; the op produces 3"):
        edgeseq.load(_save(model, tmp_path), backend=backend)


def test_an_int8_lstm_without_its_weights_is_refused_naming_the_node(tmp_path) -> None:
    def drop_w(node: onnx.NodeProto) -> None:
        node.input[1] = ""

    with pytest.raises(ModelFormatError, match=r"LSTM_quant' \(DynamicQuantizeLSTM\) cannot run"):
        edgeseq.load(_save(_int8_lstm(drop_w), tmp_path))


@pytest.mark.parametrize(
    ("dims", "shown"),
    [([2**32, 4096, 0], r"\[4294967296, 4096, 0\]"),  # holds nothing; its length is 2^32
     ([2**40] * 40, r"\[1099511627776, .*, \.\.\. \(40 dims\)\]")],  # product beyond float64
)  # fmt: skip
def test_a_constant_with_absurd_dims_is_refused_whatever_it_holds(dims, shown, tmp_path):
    model = _reference()
    constant = next(n for n in model.graph.node if n.op_type == "Constant")
    tensor = constant.attribute[0].t
    del tensor.dims[:]
    tensor.dims.extend(dims)
    with pytest.raises(ModelFormatError, match=rf"has absurd dims {shown}; expected sizes"):
        edgeseq.load(_save(model, tmp_path))


def test_a_squeeze_on_axis_2_to_the_62_is_refused_naming_the_node(tmp_path) -> None:
    model = _reference()
    squeeze = next(n for n in model.graph.node if n.op_type == "Squeeze")
    axes = next(n for n in model.graph.node if squeeze.input[1] in n.output).attribute[0].t
    axes.raw_data = np.array([2**62], np.int64).tobytes()
    with pytest.raises(ModelFormatError, match=r"\(Squeeze\) cannot run on these inputs"):
        edgeseq.load(_save(model, tmp_path))


def test_a_state_as_wide_as_a_fixed_batch_of_2_to_the_17_is_refused_before_it_is_fed(tmp_path):
    """h0 [layers, batch, hidden] is modest as declared; x's fixed batch makes it 2^23 values
    in every probe."""
    model = _reference()
    _set_dim(model, "x", 0, 2**17)
    with pytest.raises(ModelFormatError, match=r"input 'h0' .* symbolic size counted as the "
                       r"batch, 131072"):  # fmt: skip
        edgeseq.load(_save(model, tmp_path), backend="numpy")
