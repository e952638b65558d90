"""Files `edgeseq.load` must refuse, quickly, with a ModelFormatError that names the cause."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeseq.runtime  # imported up front, so the timings below measure the refusal only
from edgeseq.errors import ModelFormatError

QUICK = 5.0  # seconds: refusing a file is a check, never a computation or a wait
HIDDEN = 4


def _model(extra_nodes=(), extra_outputs=(), features: int = 3) -> onnx.ModelProto:
    """A valid one-GRU-node graph: X [time, batch, features] -> Y."""
    rng = np.random.default_rng(0)
    weights = {"W": (1, 3 * HIDDEN, features), "R": (1, 3 * HIDDEN, HIDDEN), "B": (1, 6 * HIDDEN)}
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in weights.items()]  # fmt: skip
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["time", "batch", features])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["time", 1, "batch", HIDDEN])
    gru = helper.make_node("GRU", ["X", "W", "R", "B"], ["Y"], hidden_size=HIDDEN, name="gru")
    graph = helper.make_graph([gru, *extra_nodes], "g", [x], [y, *extra_outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _external(tensor: onnx.TensorProto, **entries: object) -> bytes:
    """Move the tensor's data to external data described by `entries`; returns its bytes."""
    raw = numpy_helper.to_array(tensor).tobytes()
    del tensor.external_data[:]
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    return raw


def _save(model: onnx.ModelProto, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    return folder / "model.onnx"


def unsupported_conv(tmp: Path) -> Path:
    conv = helper.make_node("Conv", ["Y", "K"], ["Z"], name="the_conv")
    model = _model([conv], [helper.make_tensor_value_info("Z", TensorProto.FLOAT, None)])
    model.graph.initializer.append(numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "K"))
    model.graph.output[1].type.tensor_type.shape.dim.add().dim_param = "z"
    return _save(model, tmp)


def unsupported_loop(tmp: Path) -> Path:
    def scalar(name: str, kind: int) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, kind, [])

    passes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n in ("c", "v")]
    body = helper.make_graph(
        passes,
        "body",
        [
            scalar("i", TensorProto.INT64),
            scalar("c", TensorProto.BOOL),
            scalar("v", TensorProto.FLOAT),
        ],
        [scalar("c_out", TensorProto.BOOL), scalar("v_out", TensorProto.FLOAT)],
    )
    loop = helper.make_node("Loop", ["n", "", "v0"], ["L"], name="the_loop", body=body)
    model = _model([loop], [scalar("L", TensorProto.FLOAT)])
    model.graph.initializer.extend(
        [numpy_helper.from_array(np.array(v), n) for n, v in (("n", 3), ("v0", np.float32(1)))]
    )
    return _save(model, tmp)


def nan_weight(tmp: Path) -> Path:
    model = _model()
    r = numpy_helper.to_array(model.graph.initializer[1]).copy()
    r[0, 2, 1] = np.nan
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(r, "R"))
    return _save(model, tmp)


def absurd_dims(tmp: Path) -> Path:
    model = _model()  # dims claim 2**62 elements; raw_data is empty, so nothing is allocated
    huge = onnx.TensorProto(name="huge", data_type=TensorProto.FLOAT, dims=[2**31, 2**31])
    huge.raw_data = b""
    model.graph.initializer.append(huge)
    return _save(model, tmp)


def external(location: str, link: str | None = None, cut: int = 0, extra: int = 0,
             **entries: object):  # fmt: skip
    """A model whose R lives in external data at `location`; the data file sits outside the
    model's folder when the location (or the symlink `link` inside the folder) leads there."""

    def make(tmp: Path) -> Path:
        model, where = _model(), location.format(tmp=tmp)
        raw = _external(model.graph.initializer[1], location=where, **entries)
        path = _save(model, tmp / "model")
        outside = tmp / "outside"
        outside.mkdir()
        (outside / "R.bin").write_bytes(raw)
        (tmp / "secret.bin").write_bytes(raw)
        if link:  # model/<link> -> the outside folder or file
            target = outside if "/" in location else outside / "R.bin"
            os.symlink(target, tmp / "model" / link)
        elif not where.startswith(("/", "..")):
            (tmp / "model" / location).write_bytes(raw[: len(raw) - cut] + b"\0" * extra)
        return path

    return make


def constant_attribute_outside(tmp: Path) -> Path:
    """A valid external initializer, and a Constant node whose tensor points at ../secret.bin."""
    value = numpy_helper.from_array(np.zeros(4, np.float32), "leak")
    _external(value, location="../secret.bin", length=16)
    const = helper.make_node("Constant", [], ["leaked"], value=value, name="const")
    model = _model([const], [helper.make_tensor_value_info("leaked", TensorProto.FLOAT, [4])])
    raw = _external(model.graph.initializer[1], location="R.bin")
    path = _save(model, tmp / "model")
    (tmp / "model" / "R.bin").write_bytes(raw)
    (tmp / "secret.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    return path


def absurd_feature_count(tmp: Path) -> Path:
    model = _model()  # the input claims 2**62 features: allocating a probe for it cannot work
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 2**62
    return _save(model, tmp)


def _flawed(flaw):
    """A maker: the valid model with `flaw(model)` applied."""

    def make(tmp: Path) -> Path:
        model = _model()
        flaw(model)
        return _save(model, tmp)

    return make


def _x_dims(time_axis: int):
    return _flawed(lambda m: setattr(m.graph.input[0].type.tensor_type.shape.dim[0], "dim_value",
                                     time_axis))  # fmt: skip


def _other_domain(model: onnx.ModelProto) -> None:
    model.graph.node[0].domain = "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))


R_TYPE_999 = _flawed(lambda m: setattr(m.graph.initializer[1], "data_type", 999))
R_BYTES_TOO_MANY = _flawed(
    lambda m: setattr(
        m.graph.initializer[1], "raw_data", m.graph.initializer[1].raw_data + b"\0" * 4
    )
)
NO_OUTPUTS = _flawed(lambda m: m.graph.ClearField("output"))
X_STRING = _flawed(lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type",
                                     TensorProto.STRING))  # fmt: skip
CLIP_NAN = _flawed(
    lambda m: m.graph.node[0].attribute.append(helper.make_attribute("clip", np.nan))
)

REFUSALS = {
    "unsupported-conv": (unsupported_conv, r"'the_conv'.*'Conv'"),
    "unsupported-loop": (unsupported_loop, r"'the_loop'.*'Loop'"),
    "nan-weight": (nan_weight, r"'R' holds NaN"),
    "absurd-dims": (absurd_dims, r"'huge' has absurd dims \[2147483648, 2147483648\]"),
    "path-traversal": (external("../secret.bin"), r"'R' points outside the model's folder"),
    "absolute-path": (external("{tmp}/secret.bin"), r"'R' points outside the model's folder"),
    "symlinked-file": (external("R.bin", link="R.bin"), r"'R.bin' of 'R' is missing or a symbolic"),
    "symlinked-folder": (external("data/R.bin", link="data"), r"'data/R.bin' resolves outside"),
    "file-too-short": (external("R.bin", cut=8), r"'R' has 184 bytes .* 184-byte file; .*192"),
    "length-disagrees": (external("R.bin", length=100), r"'R' has 100 bytes .* needs 192"),
}


def _ok(make, message: str, name: str, history: str) -> object:
    """A case that once escaped as a bare exception (`history` says how); now refused cleanly."""
    return pytest.param(make, message, id=name)


BUGS = [
    _ok(external("R.bin", offset=-8), "offset", "negative-offset",
         "loader._external_file accepts offset -8 (offset + length still fits the file); onnx's "
         "loader then raises a bare ValueError"),
    _ok(external("R.bin", offset="abc"), "offset", "non-numeric-offset",
         "loader._external_file: int('abc') raises a bare ValueError"),
    _ok(constant_attribute_outside, r"secret\.bin", "constant-outside",
         "loader.read_model checks only graph.initializer; a Constant node's external tensor is "
         "caught by onnx's own check instead, whose ValidationError escapes unwrapped"),
    _ok(absurd_feature_count, r"features|dims", "absurd-feature-count",
         "Model.__init__ trusts X's declared feature count: _count_outputs allocates a probe of "
         "that size (2**31 -> 8 GiB; here 2**62 -> a bare ValueError)"),
    # found by the hostile-file review of session 6
    _ok(R_TYPE_999, r"'R' \(data_type 999.*unknown data_type", "unknown-data-type",
        "numpy_helper.to_array raised a bare KeyError"),
    _ok(R_BYTES_TOO_MANY, r"'R' .*cannot be read|'R' has 196 bytes", "raw-data-too-long",
        "the ONNX checker refuses too few bytes only; to_array's reshape raised ValueError"),
    _ok(external("R.bin", extra=64), r"'R' has 256 bytes .* needs 192", "external-file-too-long",
        "without a length key onnx reads to the end of the file: a bare ValueError"),
    _ok(NO_OUTPUTS, "0 outputs", "no-outputs", "graph.outputs[0] raised IndexError"),
    _ok(X_STRING, "declared STRING.*float32", "x-of-strings",
        "x's declared dtype was ignored and float32 fed"),
    _ok(_x_dims(0), r"dims \[0, 'batch', 3\]", "zero-time-axis",
        "a declared size 0 was read as a dynamic axis"),
    _ok(_x_dims(2**40), r"at most \d+ values", "huge-fixed-time-axis",
        "the output count probe allocated 2**40 steps: MemoryError"),
    _ok(_flawed(_other_domain), "domain 'com.example'", "other-domain",
        "a GRU of another domain ran as ONNX's GRU"),
    _ok(CLIP_NAN, "clip nan; expected a positive finite", "clip-nan", "clip NaN was accepted"),
]  # fmt: skip


def _refused_quickly(path: Path, message: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelFormatError, match=message):
        edgeseq.load(path)
    assert time.perf_counter() - start < QUICK


@pytest.mark.parametrize(
    ("make", "message"), [*(pytest.param(*v, id=k) for k, v in REFUSALS.items()), *BUGS]
)
def test_a_bad_file_is_refused_quickly_with_its_cause(make, message, tmp_path):
    _refused_quickly(make(tmp_path), message)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [(lambda raw: raw[: len(raw) // 2], "not a readable ONNX file"),
     (lambda raw: np.random.default_rng(0).bytes(4096), "not a readable ONNX file")],
    ids=["first-half-of-a-valid-file", "random-bytes"],
)  # fmt: skip
def test_bytes_that_are_not_an_onnx_model_are_refused_quickly(corrupt, message, tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(corrupt(_model().SerializeToString()))
    _refused_quickly(path, message)


def test_the_fixtures_are_valid_apart_from_the_one_flaw(tmp_path):
    """The good twin of every file above loads, so each refusal is about its flaw alone."""
    model = edgeseq.load(_save(_model(), tmp_path / "inline"))
    assert model.n_outputs == HIDDEN
    assert edgeseq.load(external("R.bin")(tmp_path / "ext")).plan is not None


def test_edgeseq_inspect_refuses_what_load_refuses_in_one_line(tmp_path):
    """`edgeseq inspect` printed tables (exit 0) for files that load refuses."""
    path = R_BYTES_TOO_MANY(tmp_path)
    edgeseq_cli = Path(sys.executable).with_name("edgeseq")
    done = subprocess.run([str(edgeseq_cli), "inspect", str(path)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr and "'R'" in done.stderr
