"""int8 export: smaller weights, the error measured on the held-out split, refusal past a bound."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeseq.errors import ModelFormatError
from edgeseq.export import quantize
from edgeseq.export.onnx_export import export_checkpoint
from edgeseq.train.pipeline import TrainConfig, train
from tests import toys

# int8 weights with per-channel scales keep the outputs this close to float32 (normalized units).
INT8_OUTPUT_TOLERANCE = 0.05


@pytest.fixture(scope="module", params=["rnn", "lstm", "gru"])
def run(request, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp(request.param)
    cfg = TrainConfig(cell=request.param, hidden=48, layers=2, epochs=3, window=32,
                      target_transform="none")  # fmt: skip
    train(toys.sine_series(), cfg, run_dir)
    return run_dir


def _y(path, x, layers=2, hidden=48):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    state = np.zeros((layers, 1, hidden), np.float32)
    feeds = {"x": x} | {i.name: state for i in session.get_inputs()[1:]}
    return session.run(["y"], feeds)[0]


def test_int8_export_shrinks_the_weights_and_stays_close_to_float(run, tmp_path):
    meta = export_checkpoint(run, tmp_path / "f.onnx")
    meta8 = export_checkpoint(run, tmp_path / "q.onnx", quantize="int8")
    q = meta8["quantization"]
    assert q["int8_weight_bytes"] < q["float_weight_bytes"] / 3  # int8 values, float scales
    assert (tmp_path / "q.onnx").stat().st_size < (tmp_path / "f.onnx").stat().st_size / 2
    assert q["measured_on"].startswith("held-out split")
    assert q["error_growth"] <= q["max_error"]
    assert "quantization" not in meta
    x = np.sin(np.arange(100, dtype=np.float32) / 3.0).reshape(1, 100, 1)
    std = meta["data_spec"]["target_scaling"]["std"][0]
    diff = np.abs(_y(tmp_path / "q.onnx", x) - _y(tmp_path / "f.onnx", x)) / std
    assert diff.max() < INT8_OUTPUT_TOLERANCE


def test_int8_weights_are_really_int8_in_the_file(run, tmp_path):
    export_checkpoint(run, tmp_path / "q.onnx", quantize="int8")
    model = onnx.load(tmp_path / "q.onnx")
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    big_floats = [
        t.name
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) >= 48 * 48
    ]
    assert int8 and not big_floats


def test_an_int8_export_whose_error_grows_too_much_is_refused_with_figures(
    run, tmp_path, monkeypatch
):
    real_report = quantize.report

    def worse(*args, **kwargs):
        return real_report(*args, **kwargs) | {"int8_error": 9.0, "error_growth": 8.5}

    monkeypatch.setattr(quantize, "report", worse)
    with pytest.raises(
        ModelFormatError, match=r"grows from .* to 9 \(\+8\.5 > --max-error 0\.02\)"
    ):
        export_checkpoint(run, tmp_path / "q.onnx", quantize="int8")
    assert list(tmp_path.iterdir()) == []


def test_per_channel_int8_round_trips_each_channel_within_half_a_step():
    weights = np.random.default_rng(0).standard_normal((1, 12, 5)).astype(np.float32)
    weights[0, 3] *= 100  # one loud channel must not cost the others their resolution
    values, scale = quantize._per_channel(weights, axis=1)
    restored = values * scale.reshape(1, -1, 1)
    assert np.all(np.abs(restored - weights) <= scale.reshape(1, -1, 1) / 2 + 1e-7)
    assert scale[0] < scale[3] / 10
