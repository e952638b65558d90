"""A forecast's target transforms (spec.TargetTransform), end to end: NumPy's transform and its
inverse agree; every transform exports with its inverse in the graph; ONNX Runtime's whole
sequence equals its own one-sample-at-a-time run with the state fed back; edgeseq's runtime
streams it on the fused plan (TransformIn/TransformOut cells) equal to ONNX Runtime, on every
backend; the seasonal transform's past values (lag0 -> lagn) round-trip through
`stream.state` and through a daemon's checkpoint; `auto` keeps the transform with the lowest
validation RMSE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest

import edgeseq
from edgeseq.artifact import LAG_INPUT, load_info, sample_feeds
from edgeseq.data import target_transform
from edgeseq.data.tables import Columns, from_frame
from edgeseq.errors import DataError, UsageError
from edgeseq.export.onnx_export import export_checkpoint
from edgeseq.runtime.kernels import program as ir
from edgeseq.spec import TRANSFORMS, TargetTransform
from edgeseq.train.pipeline import TrainConfig, train
from tests.daemon_harness import DaemonProcess, LineClient

SEASON, HORIZON = 12, 2
TRANSFORMED = [name for name in TRANSFORMS if name != "none"]
TOL = 1e-5  # relative to the forecasts' size: float32 through log/exp and a network


def _series(rows: int = 480, seed: int = 0) -> pd.DataFrame:
    """A positive series with a trend and a season, and a covariate."""
    t = np.arange(rows)
    rng = np.random.default_rng(seed)
    y = 40 + 0.08 * t + 4 * np.sin(2 * np.pi * t / SEASON) + rng.normal(0, 0.4, rows)
    return pd.DataFrame({"t": t, "y": y, "c": np.cos(t / 5.0)})


def _data(frame: pd.DataFrame | None = None):
    return from_frame(_series() if frame is None else frame,
                      Columns(targets=("y",), features=("c",), time_col="t"))  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """One small exported forecaster per transform (2 steps ahead, season 12)."""
    root = tmp_path_factory.mktemp("transforms")
    paths = {}
    for name in TRANSFORMED:
        cfg = TrainConfig(task="forecast", hidden=8, epochs=3, horizon=HORIZON, season=SEASON,
                          target_transform=name)  # fmt: skip
        train(_data(), cfg, root / name)
        paths[name] = root / name / "model.onnx"
        export_checkpoint(root / name, paths[name])
    return paths


@pytest.mark.parametrize("name", TRANSFORMS)
def test_the_numpy_transform_and_its_inverse_give_back_the_targets(name):
    targets = _series()[["y"]].to_numpy()
    transform = TargetTransform(name, SEASON)
    learned = target_transform.ahead(targets, transform, HORIZON)
    forecasts = target_transform.inverse(learned, targets, transform)
    for k in range(1, HORIZON + 1):
        np.testing.assert_allclose(forecasts[:-k, k - 1], targets[k:], rtol=1e-12)
    if transform.lag:  # the first change of a fresh series is 0: its first value primes it
        assert target_transform.inputs(targets, transform)[0, 0] == 0.0


def test_the_log_of_a_series_that_reaches_zero_is_refused_naming_the_choice(tmp_path):
    frame = _series()
    frame.loc[10, "y"] = 0.0
    cfg = TrainConfig(task="forecast", hidden=4, epochs=1, target_transform="log-diff")
    with pytest.raises(
        DataError, match=r"log-diff takes the log .* reaches 0; expected values > 0"
    ):
        train(_data(frame), cfg, tmp_path / "run")


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"target_transform": "seasonal"}, "needs --season"),
     ({"target_transform": "cube"}, "expected auto or one of"),
     ({"target_transform": "seasonal", "season": 1, "horizon": 2}, "at least --horizon")],
)  # fmt: skip
def test_impossible_transform_options_are_refused_before_training(changes, message, tmp_path):
    cfg = TrainConfig(task="forecast", hidden=4, epochs=1, **changes)
    with pytest.raises(UsageError, match=message):
        train(_data(), cfg, tmp_path / "run")


@pytest.mark.parametrize("name", TRANSFORMED)
def test_the_graph_carries_the_transform_and_onnx_runtime_streams_it_as_a_whole(exported, name):
    proto, info = load_info(exported[name])
    transform = info.data_spec.target_transform
    assert transform is not None and transform.name == name
    inputs = [i.name for i in proto.graph.input]
    assert (LAG_INPUT in inputs) == bool(transform.lag)
    assert info.metadata["parity"]["torch_vs_onnxruntime_full_sequence"] <= TOL
    assert info.metadata["parity"]["onnxruntime_streamed_vs_torch_full_sequence"] <= TOL
    feeds = sample_feeds(info.model_spec, info.data_spec, 1, 200, seed=3)
    session = ort.InferenceSession(str(exported[name]))
    full = session.run(None, feeds)[0][0]
    state = {k: v for k, v in feeds.items() if k != "x"}
    stepped = []
    for t in range(200):
        out = session.run(None, {"x": feeds["x"][:, t : t + 1], **state})
        stepped.append(out[0][0, 0])
        state = dict(zip(state, out[1:], strict=True))
    np.testing.assert_allclose(np.array(stepped), full, rtol=TOL, atol=TOL * np.abs(full).max())


@pytest.mark.parametrize("backend", ["numba", "numpy", "onnxruntime"])
@pytest.mark.parametrize("name", TRANSFORMED)
def test_edgeseqs_runtime_streams_the_transform_as_onnx_runtime_computes_it(
    exported, name, backend
):
    _, info = load_info(exported[name])
    feeds = sample_feeds(info.model_spec, info.data_spec, 1, 150, seed=4)  # zero states
    x = feeds["x"]
    full = ort.InferenceSession(str(exported[name])).run(None, feeds)[0][0]
    model = edgeseq.load(exported[name], backend=backend)
    stream = model.stream()
    streamed = np.stack([stream.step(sample) for sample in x[0]])
    np.testing.assert_allclose(streamed, full, rtol=TOL, atol=TOL * np.abs(full).max())
    np.testing.assert_array_equal(model.stream().feed(x[0]), streamed)
    if backend == "numba":  # the fused plan, with the transform's own cells around the network
        assert model.plan is not None, model.plan_note
        assert isinstance(model.plan.ops[0], ir.TransformIn)
        assert isinstance(model.plan.ops[-1], ir.TransformOut)


@pytest.mark.parametrize("name", ["diff", "log-seasonal"])
def test_a_pool_answers_as_its_streams_do(exported, name):
    """To a few float32 ulps (tests/pool_checks.py says why not bit for bit)."""
    model = edgeseq.load(exported[name])
    _, info = load_info(exported[name])
    x = sample_feeds(info.model_spec, info.data_spec, 64, 20, seed=5)["x"]
    pool, ids = model.pool(64), [f"s{i}" for i in range(64)]
    streams = [model.stream() for _ in ids]
    for t in range(x.shape[1]):
        alone = np.stack([s.step(x[b, t]) for b, s in enumerate(streams)])
        np.testing.assert_allclose(pool.step(ids, x[:, t]), alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["numba", "numpy", "onnxruntime"])
def test_the_seasonal_past_round_trips_through_stream_state(exported, backend):
    """A stream restored from another's state halfway continues exactly as the original,
    seasonal bases included (the season is longer than the first half)."""
    path = exported["seasonal"]
    _, info = load_info(path)
    x = sample_feeds(info.model_spec, info.data_spec, 1, 3 * SEASON, seed=6)["x"][0]
    model = edgeseq.load(path, backend=backend)
    whole = model.stream().feed(x)
    first = model.stream()
    first.feed(x[: SEASON - 2])
    saved = first.state
    assert saved[LAG_INPUT].shape == ((1 + SEASON) * 1,)
    assert saved[LAG_INPUT][0] == 1.0  # seen
    resumed = model.stream()
    resumed.state = saved
    np.testing.assert_array_equal(resumed.feed(x[SEASON - 2 :]), whole[SEASON - 2 :])
    fresh = model.stream()  # without the past: the seasonal bases differ
    assert not np.array_equal(fresh.feed(x[SEASON - 2 :]), whole[SEASON - 2 :])


def test_the_seasonal_past_survives_a_daemon_checkpoint_and_restart(exported, tmp_path):
    path = exported["seasonal"]
    _, info = load_info(path)
    x = sample_feeds(info.model_spec, info.data_spec, 1, 2 * SEASON, seed=7)["x"][0]
    expected = edgeseq.load(path).stream().feed(x)
    args = (str(path), "--listen", "tcp://127.0.0.1:0", "--state-dir", str(tmp_path / "state"))
    got = []
    for part in (range(0, SEASON - 3), range(SEASON - 3, 2 * SEASON)):
        with DaemonProcess(*args) as daemon:
            client = LineClient(daemon.tcp_port)
            if part.start:
                assert daemon.wait_for("states restored")["streams"] == 1
            for t in part:
                answer = client.ask({"id": "meter", "seq": t, "x": x[t].tolist()})
                got.append(answer["y"])
            client.close()
            assert daemon.stop() == 0
    np.testing.assert_allclose(np.array(got, np.float32), expected, rtol=1e-6, atol=1e-6)


def test_auto_keeps_the_transform_with_the_lowest_validation_rmse(tmp_path):
    cfg = TrainConfig(task="forecast", hidden=8, epochs=3, season=SEASON)
    result = train(_data(), cfg, tmp_path / "run")
    tried = result.metrics["target_transform_validation_rmse"]
    assert set(tried) == {"none", "diff", "log-diff", "seasonal", "log-seasonal"}
    assert result.metrics["target_transform"] == min(tried, key=lambda k: tried[k])
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["target_transform"] == result.metrics["target_transform"]
    assert "holt_winters" in saved["baselines"] and saved["baselines"]["holt_winters"]["n"] > 0


def test_the_cli_takes_the_transform_and_prints_it_with_the_classical_baseline(tmp_path):
    csv = tmp_path / "series.csv"
    _series().to_csv(csv, index=False)
    proc = subprocess.run(
        [sys.executable, "-m", "edgeseq", "train", str(csv), "--target", "y", "--time-col", "t",
         "--season", str(SEASON), "--target-transform", "seasonal", "--epochs", "2",
         "--hidden", "4", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "target transform: seasonal (as asked)" in proc.stdout
    assert "holt winters" in proc.stdout


def test_an_int8_export_keeps_the_transform_and_runs_fused(exported, tmp_path):
    run = exported["diff"].parent
    export_checkpoint(run, tmp_path / "q.onnx", quantize="int8")
    _, info = load_info(tmp_path / "q.onnx")
    feeds = sample_feeds(info.model_spec, info.data_spec, 1, 100, seed=8)
    full = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, feeds)[0][0]
    model = edgeseq.load(tmp_path / "q.onnx")
    assert model.plan is not None and isinstance(model.plan.ops[0], ir.TransformIn)
    assert model.plan.uses(*ir.INT8)
    streamed = model.stream().feed(feeds["x"][0])
    # int8 activations in ONNX Runtime, weights only in the fused plan: close, not equal
    np.testing.assert_allclose(streamed, full, rtol=0.02, atol=0.02 * np.abs(full).max())


def test_a_seq2seq_forecaster_with_a_seasonal_transform_streams_fused(tmp_path):
    cfg = TrainConfig(task="seq2seq", hidden=8, epochs=2, horizon=3, season=SEASON,
                      target_transform="seasonal")  # fmt: skip
    train(_data(), cfg, tmp_path / "run")
    export_checkpoint(tmp_path / "run", tmp_path / "m.onnx")
    _, info = load_info(tmp_path / "m.onnx")
    feeds = sample_feeds(info.model_spec, info.data_spec, 1, 60, seed=9)
    full = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, feeds)[0][0]
    model = edgeseq.load(tmp_path / "m.onnx")
    assert model.plan is not None, model.plan_note
    assert [type(op) for op in model.plan.ops[:1] + model.plan.ops[-1:]] == [
        ir.TransformIn,
        ir.TransformOut,
    ]
    assert model.plan.uses(ir.LstmDecoder)
    streamed = np.stack([model.stream().step(x) for x in feeds["x"][0][:1]])
    np.testing.assert_allclose(streamed, full[:1], rtol=TOL, atol=TOL * np.abs(full).max())
    stream = model.stream()
    streamed = np.stack([stream.step(x) for x in feeds["x"][0]])
    np.testing.assert_allclose(streamed, full, rtol=TOL, atol=TOL * np.abs(full).max())
