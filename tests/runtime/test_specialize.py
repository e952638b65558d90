"""Per-model kernels (runtime/planning/specialize.py): the interpreter's results to float32
rounding on
every reference model with a fused plan; safe source files; every kind of sample accepted or
refused as before."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import edgeseq
from edgeseq import config
from edgeseq.errors import ShapeError
from edgeseq.runtime.kernels import interpreter as kernels
from edgeseq.runtime.kernels import program as ir
from edgeseq.runtime.planning.specialize import compile_kernel, source, work_size

ROOT = Path(__file__).resolve().parents[2]
# Every reference model whose plan the interpreter runs too: the int8 models and the seq2seq
# decoder use ops only the model's own kernel runs (program.OWN_KERNEL_ONLY), so there is no
# interpreter to compare with; test_int8.py and test_seq2seq_plan.py (beside this file) check
# them against their graphs instead.
PLANNED = [
    p
    for p in sorted((ROOT / "export").glob("*.onnx"))
    if "seq2seq" not in p.stem and not p.stem.endswith("-int8")
]
# One model of each cell kind and a classifier's head, named: the first four of PLANNED were these
# until the 2 x 256 and 2 x 512 bench models sorted in between.
ALIGNMENT_MODELS = [
    ROOT / "export" / f"{stem}.onnx"
    for stem in ("bench-gru", "bench-lstm", "bench-rnn", "classes-classify-gru")
]
# The same float32 arithmetic compiled twice (sizes read at run time, or literals) may round a
# few sums differently under fast-math reassociation: a few ulps, never more.
ROUNDING = 2e-6
LSTM = ROOT / "export" / "pump-lstm.onnx"


def _inputs(model, rng, steps: int) -> np.ndarray:
    return (rng.standard_normal((steps, model.n_features)) * 2).astype(np.float32)


@pytest.mark.parametrize("path", PLANNED, ids=lambda p: p.stem)
def test_the_models_own_kernel_equals_the_interpreter_to_float32_rounding(path, rng):
    model = edgeseq.load(path)
    plan = model.plan
    assert plan is not None, model.plan_note
    xs = _inputs(model, rng, 300)
    state, scratch = plan.initial_state.copy(), np.zeros((3, plan.width), np.float32)
    expected = np.zeros((len(xs), plan.n_outputs), np.float32)
    assert kernels.feed(plan.code, plan.params, xs, state, scratch, expected) == -1
    stream = model.stream()
    stepped = np.stack([stream.step(x) for x in xs])
    np.testing.assert_allclose(stepped, expected, rtol=ROUNDING, atol=ROUNDING)
    ended = stream.state  # and the state it ends in
    for layer in plan.layers:
        h = state[layer.h_offset : layer.h_offset + layer.hidden]
        np.testing.assert_allclose(ended[f"{layer.node}.h"], h, rtol=ROUNDING, atol=ROUNDING)
        if layer.c_offset >= 0:
            c = state[layer.c_offset : layer.c_offset + layer.hidden]
            np.testing.assert_allclose(ended[f"{layer.node}.c"], c, rtol=ROUNDING, atol=ROUNDING)
    stream.reset()
    np.testing.assert_array_equal(stream.feed(xs), stepped)  # one kernel: exactly equal


def test_the_source_is_the_same_text_for_the_same_plan_and_names_every_size():
    plan = edgeseq.load(LSTM).plan
    assert plan is not None
    text = source(plan)
    assert text == source(edgeseq.load(LSTM).plan)  # type: ignore[arg-type]
    assert "cells.lstm(p, " in text and "cells.dense(p, " in text
    assert "work.shape[0] != " in text  # the kernel refuses buffers of another model


def test_a_tampered_kernel_file_is_rewritten_before_it_is_imported(tmp_path, monkeypatch):
    from edgeseq.runtime.planning import specialize

    monkeypatch.setattr(config, "ENV", dataclasses.replace(config.ENV, kernel_dir=tmp_path))
    monkeypatch.setattr(specialize, "_loaded", {})
    plan = edgeseq.load(LSTM).plan
    assert plan is not None
    compile_kernel(plan)
    (written,) = tmp_path.glob("edgeseq_kernel_*.py")
    assert written.read_text() == source(plan)
    written.write_text("raise SystemExit('tampered')\n")
    specialize._loaded.clear()
    kernel = compile_kernel(plan)
    assert written.read_text() == source(plan)
    work = np.zeros(work_size(plan), np.float32)
    work[: plan.state_size] = plan.initial_state
    out = np.zeros(plan.n_outputs, np.float32)
    assert kernel(plan.params, np.zeros(plan.n_features, np.float32), work, out) == -1


def test_kernels_go_beside_numba_s_cache_when_a_service_sets_one(monkeypatch, tmp_path):
    assert config.kernel_dir({"NUMBA_CACHE_DIR": str(tmp_path)}) == tmp_path / "edgeseq-kernels"
    assert config.kernel_dir({"EDGESEQ_KERNEL_DIR": "/k", "NUMBA_CACHE_DIR": "/n"}) == Path("/k")
    assert config.kernel_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/edgeseq/kernels")


def test_a_kernel_refuses_arrays_of_another_length_instead_of_reading_past_them():
    plan = edgeseq.load(LSTM).plan
    assert plan is not None
    kernel = compile_kernel(plan)
    work = np.zeros(work_size(plan), np.float32)
    x, out = np.zeros(plan.n_features, np.float32), np.zeros(plan.n_outputs, np.float32)
    assert kernel(plan.params, x[:-1], work, out) == -2
    assert kernel(plan.params, x, work[:-1], out) == -2
    assert kernel(plan.params[:-1], x, work, out) == -2


SAMPLES = {
    "list": lambda x: [float(v) for v in x],
    "float64": lambda x: x.astype(np.float64),
    "read-only": lambda x: np.frombuffer(x.tobytes(), np.float32),
    "big-endian": lambda x: x.astype(">f4"),
    "strided": lambda x: np.repeat(x, 2)[::2],
    "int": lambda x: np.round(x).astype(np.int64),
}


@pytest.mark.parametrize("kind", SAMPLES)
def test_every_kind_of_sample_gives_what_a_float32_vector_gives(kind, rng):
    model = edgeseq.load(LSTM)
    xs = _inputs(model, rng, 20)
    if kind == "int":
        xs = np.round(xs)
    plain, other = model.stream(), model.stream()
    for x in xs:
        np.testing.assert_array_equal(other.step(SAMPLES[kind](x)), plain.step(x))


@pytest.mark.parametrize(
    "bad", [np.zeros(5, np.float32), np.zeros((1, 3), np.float32), "abc", [[1.0, 2.0]], None]
)
def test_a_sample_of_the_wrong_shape_or_type_is_refused_and_the_state_kept(bad):
    stream = edgeseq.load(LSTM).stream()
    before = stream.state
    with pytest.raises(ShapeError, match="sample"):
        stream.step(bad)
    for key, value in stream.state.items():
        np.testing.assert_array_equal(value, before[key])


def test_streams_of_one_model_stepped_from_two_threads_stay_exact(rng):
    model = edgeseq.load(LSTM)
    xs = _inputs(model, rng, 2000)
    expected = model.stream().feed(xs)
    results: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        stream = model.stream()
        results[i] = np.stack([stream.step(x) for x in xs])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        np.testing.assert_array_equal(results[i], expected)


def test_specialization_can_be_switched_off_and_gives_the_same_outputs(rng, tmp_path):
    xs = _inputs(edgeseq.load(LSTM), rng, 50)
    np.save(tmp_path / "xs.npy", xs)
    script = (
        "import sys, numpy as np, edgeseq\n"
        f"s = edgeseq.load({str(LSTM)!r}).stream()\n"
        "assert s._kernel is None\n"
        f"np.save({str(tmp_path / 'ys.npy')!r}, s.feed(np.load({str(tmp_path / 'xs.npy')!r})))\n"
    )
    env = dict(os.environ, EDGESEQ_SPECIALIZE="0")
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    expected = edgeseq.load(LSTM).stream().feed(xs)
    np.testing.assert_array_equal(np.load(tmp_path / "ys.npy"), expected)


@pytest.mark.parametrize("path", ALIGNMENT_MODELS, ids=lambda p: p.stem)
def test_weights_and_scratch_start_on_cache_lines(path):
    """Every weight block of 16 floats or more, the parameter vector and a stream's work vector
    start on a 64-byte line (runtime/aligned.py), in every process, whatever numpy's allocator
    returned."""
    model = edgeseq.load(path)
    plan = model.plan
    assert plan.params.ctypes.data % 64 == 0
    assert plan.width % 16 == 0
    for op in plan.ops:
        if isinstance(op, ir.Lstm | ir.Rnn):
            assert op.off_wt % 16 == 0, op  # the stacked [W; R]
        if isinstance(op, ir.Gru):
            assert op.off_wx % 16 == 0 and op.off_rh % 16 == 0, op
        if isinstance(op, ir.Dense) and op.n_in * op.n_out >= 16:
            assert op.off_w % 16 == 0, op
    work = model.stream()._work
    assert work.ctypes.data % 64 == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_sees_every_nan_and_infinity_wherever_it_is(bad):
    """The kernels' rollback relies on it; LLVM folds some spellings of it to True."""
    from numba import njit

    from edgeseq.runtime.kernels import cells
    from edgeseq.runtime.kernels.fastmath import FASTMATH

    check = njit(fastmath=FASTMATH, error_model="numpy")(lambda v: cells.all_finite(v))
    assert check(np.ones(37, np.float32))
    for at in (0, 7, 8, 31, 36):
        v = np.ones(37, np.float32)
        v[at] = bad
        assert not check(v), at


def test_the_stream_and_one_thread_pool_kernels_run_without_numba_s_runtime():
    """Reference counting through NRT cost a quarter of a small model's step (specialize.py):
    the kernels that need no allocation are built without it."""
    plan = edgeseq.load(LSTM).plan
    assert plan is not None
    module = sys.modules[compile_kernel(plan).__module__]
    for name in ("advance", "advance_rows", "_span", "_check_rows"):
        assert getattr(module, name).targetoptions.get("_nrt") is False, name
    assert module.advance_rows_parallel.targetoptions.get("_nrt", True) is not False
