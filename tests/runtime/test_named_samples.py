"""A sample given by feature name ({"pressure": 2.5, "flow": 1.0, "temperature": 40.0}) is the
sample in the model's own order, in Python and on the daemon's wire; a missing or unknown name,
or a name for a model without feature names, is refused naming what the model takes, and the
stream's state is kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import edgeseq
from edgeseq.daemon.protocol import BadMessage, parse_json, width_of
from edgeseq.errors import ShapeError
from tests.daemon_harness import ROOT, DaemonProcess, LineClient

PUMP = ROOT / "export" / "pump-lstm.onnx"  # takes pressure, flow, temperature (in that order)
NAMED = {"flow": 1.0, "temperature": 40.0, "pressure": 2.5}  # the CSV's order, not the model's


def test_the_readme_pump_example_by_name_and_by_position_gives_one_answer():
    model = edgeseq.load(PUMP)
    assert model.feature_names == ("pressure", "flow", "temperature")
    by_name, by_position = model.stream(), model.stream()
    for scale in (1.0, 1.1, 0.9):
        sample = {k: v * scale for k, v in NAMED.items()}
        ordered = [sample["pressure"], sample["flow"], sample["temperature"]]
        np.testing.assert_array_equal(by_name.step(sample), by_position.step(ordered))


@pytest.mark.parametrize(
    ("sample", "message"),
    [({"flow": 1.0, "temperature": 40.0}, r"has no 'pressure'; the model takes 'pressure', "
      r"'flow', 'temperature'"),
     ({**NAMED, "rpm": 3.0}, r"names 'rpm', which the model does not take; it takes "
      r"'pressure', 'flow', 'temperature'"),
     ({**NAMED, "pressure": "high"}, r"real numbers|<U4|sample")],
)  # fmt: skip
def test_a_wrong_name_is_refused_naming_the_expected_ones_and_the_state_kept(sample, message):
    stream = edgeseq.load(PUMP).stream()
    stream.step(NAMED)
    before = stream.state
    with pytest.raises(ShapeError, match=message):
        stream.step(sample)
    for key, value in stream.state.items():
        np.testing.assert_array_equal(value, before[key])


def test_a_model_without_feature_names_refuses_a_sample_by_name(tmp_path):
    proto = onnx.load(PUMP)
    del proto.metadata_props[:]
    onnx.save(proto, tmp_path / "bare.onnx")
    model = edgeseq.load(tmp_path / "bare.onnx")
    assert model.feature_names == ()
    with pytest.raises(ShapeError, match=r"no feature names .* give its values in order"):
        model.stream().step(NAMED)


def test_the_wire_takes_x_by_name_and_refuses_wrong_names_with_a_code():
    width = width_of(3, ("pressure", "flow", "temperature"))
    sample = parse_json(b'{"id": "p", "seq": 0, "x": {"flow": 1, "temperature": 40, '
                        b'"pressure": 2.5}}', width, 1000)  # fmt: skip
    assert sample.x == [2.5, 1.0, 40.0]
    bad = {b'{"id": "p", "seq": 0, "x": {"flow": 1, "temperature": 40}}': "wrong_features",
           b'{"id": "p", "seq": 0, "x": {"flow": 1, "temperature": 40, "pressure": 2, "rpm": 1}}':
           "wrong_features",
           b'{"id": "p", "seq": 0, "x": {"flow": 1, "temperature": 40, "pressure": "x"}}':
           "bad_x"}  # fmt: skip
    for line, code in bad.items():
        with pytest.raises(BadMessage) as refused:
            parse_json(line, width, 1000)
        assert refused.value.code == code
    with pytest.raises(BadMessage, match="no feature names"):
        parse_json(b'{"id": "p", "seq": 0, "x": {"flow": 1}}', 3, 1000)


def test_the_daemon_answers_a_sample_by_name_as_the_same_sample_by_position(tmp_path: Path):
    with DaemonProcess(str(PUMP), "--listen", "tcp://127.0.0.1:0") as daemon:
        client = LineClient(daemon.tcp_port)
        named = client.ask({"id": "a", "seq": 0, "x": NAMED})
        ordered = client.ask({"id": "b", "seq": 0, "x": [2.5, 1.0, 40.0]})
        assert named["y"] == ordered["y"]
        refused = client.ask({"id": "a", "seq": 1, "x": {"flow": 1.0}})
        assert refused["error"]["code"] == "wrong_features"
        assert "'pressure', 'flow', 'temperature'" in refused["error"]["message"]
        again = client.ask({"id": "a", "seq": 1, "x": NAMED})  # the stream was not disturbed
        second = client.ask({"id": "b", "seq": 1, "x": [2.5, 1.0, 40.0]})
        assert again["y"] == second["y"]
        client.close()
        assert daemon.stop() == 0
