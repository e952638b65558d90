"""Pools on the onnxruntime and numpy backends step all their streams in one call (stacked.py),
and must answer exactly what separate streams answer, whatever joins, leaves or overflows."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import edgeseq
from edgeseq.runtime.pools.stacked import Stacker

ROOT = Path(__file__).resolve().parents[2]
CELL_MODELS = [ROOT / "export" / f"pump-{c}.onnx" for c in ("rnn", "lstm", "gru")]
STACKED = 1e-5  # |a - b| <= 1e-5 (1 + |b|): a stacked step sums in another order (stacked.py)


def _samples(model: edgeseq.Model, rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mean = np.asarray(model.info.data_spec.input_scaling.mean, np.float32)
    std = np.asarray(model.info.data_spec.input_scaling.std, np.float32)
    return (rng.standard_normal((rows, model.n_features)) * std + mean).astype(np.float32)


@pytest.mark.parametrize("backend", ["numpy", "onnxruntime"])
@pytest.mark.parametrize("path", CELL_MODELS, ids=lambda p: p.stem)
def test_a_stacked_pool_equals_separate_streams_as_streams_join_leave_and_reset(path, backend):
    model = edgeseq.load(path, backend=backend)
    pool, alone = model.pool(capacity=8), {}
    schedule = [  # ids stepped at each time, in the order given
        ["a", "b", "c"],
        ["c", "a", "b"],
        ["b", "d", "a", "c"],
        ["d", "c"],
        ["e", "a", "d"],
        ["a", "b", "c", "d", "e"],
        ["e", "c", "b"],
    ]
    for t, ids in enumerate(schedule):
        if t == 4:
            pool.evict("b"), alone.pop("b")
            pool.reset("c"), alone.pop("c")
        xs = _samples(model, len(ids), seed=t)
        got = pool.step(ids, xs)
        for i, sid in enumerate(ids):
            stream = alone.setdefault(sid, model.stream())
            np.testing.assert_allclose(got[i], stream.step(xs[i]), rtol=STACKED, atol=STACKED)
    stacker = model._engine.stacker
    assert stacker.proven, stacker.reason  # else the loop above tested the one-by-one path
    for sid, stream in alone.items():
        for key, value in stream.state.items():
            np.testing.assert_allclose(pool.state(sid)[key], value, rtol=STACKED, atol=STACKED)


def test_a_stream_that_overflows_in_a_stacked_pool_answers_nan_and_keeps_its_state():
    model = edgeseq.load(CELL_MODELS[1], backend="numpy")
    pool, twin = model.pool(capacity=3), model.stream()
    pool.step(["a", "b"], np.ones((2, 3), np.float32))
    twin.step(np.ones(3, np.float32))
    kept = pool.state("a")
    out = pool.step(["a", "b"], np.array([[3e38] * 3, [1.0] * 3], np.float32))
    assert model._engine.stacker.proven
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()
    assert all(np.array_equal(pool.state("a")[k], v) for k, v in kept.items())
    np.testing.assert_allclose(
        out[1], twin.step(np.ones(3, np.float32)), rtol=STACKED, atol=STACKED
    )


def _swap_streams(run):
    """A batch call that hands each stream its neighbour's answer: what a graph whose reshapes
    mix the batch would do."""

    def mixed(x, state):
        y, after = run(x, state)
        return np.roll(y, 1, axis=0 if y.shape[0] == x.shape[0] else 1), after

    return mixed


@pytest.mark.parametrize(
    "wrap, reason",
    [
        (_swap_streams, "stacked steps differ from separate ones"),
        (lambda run: lambda x, s: (np.zeros((1, 1), np.float32), run(x, s)[1]), "no single batch"),
        (lambda run: lambda x, s: 1 / 0, "a stacked step failed \\(ZeroDivisionError"),
    ],
    ids=["mixes-streams", "no-batch-axis", "raises"],
)
def test_a_batch_call_not_proven_equal_to_separate_steps_is_not_used(wrap, reason):
    model = edgeseq.load(CELL_MODELS[2], backend="numpy")
    engine = model._engine
    engine.stacker = Stacker(wrap(engine._run_batch), engine.step, engine.new_state,
                             model.n_features, model.n_outputs, model.time_first)  # fmt: skip
    pool, alone = model.pool(capacity=4), [model.stream() for _ in range(3)]
    for t in range(4):
        xs = _samples(model, 3, seed=t)
        got = pool.step(["a", "b", "c"], xs)
        for i, stream in enumerate(alone):
            np.testing.assert_array_equal(got[i], stream.step(xs[i]))  # the one-by-one path
    assert not engine.stacker.proven
    assert re.search(reason, engine.stacker.reason), engine.stacker.reason


def test_a_stacked_call_that_fails_after_its_proof_falls_back_to_one_stream_at_a_time():
    model = edgeseq.load(CELL_MODELS[0], backend="numpy")
    pool, alone = model.pool(capacity=3), [model.stream() for _ in range(3)]
    xs = _samples(model, 3, seed=1)
    pool.step(["a", "b", "c"], xs)
    for stream, x in zip(alone, xs, strict=True):
        stream.step(x)
    stacker = model._engine.stacker
    assert stacker.proven

    def broken(x, state):
        raise RuntimeError("the runtime fell over")

    stacker._run = broken
    got = pool.step(["a", "b", "c"], xs)
    expected = np.stack([s.step(x) for s, x in zip(alone, xs, strict=True)])
    np.testing.assert_allclose(got, expected, rtol=STACKED, atol=STACKED)  # nothing stepped twice
    assert not stacker.proven and "the runtime fell over" in stacker.reason


def test_a_stacked_pool_holds_no_memory_beyond_its_states_as_streams_come_and_go():
    """Streams that sit out a step must not keep that step's batch arrays alive (views would:
    35x the states' own size in the session-7 review)."""
    import tracemalloc

    model = edgeseq.load(CELL_MODELS[1], backend="onnxruntime")
    pool = model.pool(capacity=300)
    ids = [f"s{i}" for i in range(300)]
    pool.step(ids, _samples(model, 300, seed=3))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for t in range(40):  # a sliding window of 256 of the 300 streams
        window = [ids[(t + i) % 300] for i in range(256)]
        pool.step(window, _samples(model, 256, seed=t))
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    state_bytes = sum(v.nbytes for v in pool.state("s0").values()) * 300
    assert model._engine.stacker.proven
    assert grown < state_bytes, (grown, state_bytes)


def test_states_whose_sum_overflows_are_kept_and_stacking_stays_on(tmp_path):
    """The finite check sums each stacked state first (no temporary when all is well): a sum
    that overflows on finite states must neither warn (warnings are errors here) nor count as
    a failure that turns stacking off."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    eye = numpy_helper.from_array(np.eye(4, dtype=np.float32)[None], "W")
    zeros = numpy_helper.from_array(np.zeros((1, 4, 4), np.float32), "R")
    node = helper.make_node("RNN", ["x", "W", "R"], ["", "y"], hidden_size=4,
                            activations=["Relu"])  # fmt: skip
    graph = helper.make_graph(
        [node], "relu-rnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "B", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "B", 4])],
        [eye, zeros],
    )  # fmt: skip
    path = tmp_path / "relu-rnn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    model = edgeseq.load(path, backend="numpy")
    pool = model.pool(capacity=2)
    got = pool.step(["a", "b"], np.full((2, 4), 3e38, np.float32))
    assert model._engine.stacker.proven, model._engine.stacker.reason
    np.testing.assert_array_equal(got, np.full((2, 4), 3e38, np.float32))
    np.testing.assert_array_equal(pool.state("b")[next(iter(pool.state("b")))], got[1])


@pytest.mark.parametrize(
    "path, backend, note",
    [
        (CELL_MODELS[1], "numba", "one kernel call per pool step"),
        (CELL_MODELS[1], "onnxruntime", "streams stacked into one call per pool step"),
        (
            ROOT / "export" / "pump-lstm-int8.onnx",
            "numpy",
            "one call per stream: stacked steps differ",
        ),
    ],
    ids=["numba", "stacked", "int8-refused"],
)
def test_a_model_says_how_its_pools_step(path, backend, note):
    model = edgeseq.load(path, backend=backend)
    assert model.pool_note.startswith(note)
    assert model.plan_note  # which plan, or why none: the daemon logs both at start
