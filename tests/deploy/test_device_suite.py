"""What must hold on every board. `make test` runs it here; `make test-aarch64` runs it on 64-bit
ARM under QEMU, inside a bundle installed by its own install.sh (no torch, no onnxruntime: only
numpy and edgeseq's runtime and daemon, as on a Raspberry Pi)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest

import edgeseq
from tests.daemon_harness import DaemonProcess, LineClient

ROOT = Path(__file__).resolve().parents[2]
# Every reference model but the large speed-benchmark shapes of issue 17 (bench-lstm-256/-512 and
# their int8 twins, 0.8-13 MB): under QEMU they would add a minute to this suite and prove nothing
# the 2 x 64 bench models do not (the same ops through the same kernels, sizes read at run time);
# tests/runtime/test_runtime.py checks them against their golden outputs on the host.
MAX_MODEL_BYTES = 512 * 1024
MODELS = sorted(p for p in (ROOT / "export").glob("*.onnx") if p.stat().st_size <= MAX_MODEL_BYTES)
CELL_MODELS = [ROOT / "export" / f"pump-{cell}.onnx" for cell in ("rnn", "lstm", "gru")]
TOLERANCE = 1e-5  # float32 parity (issue 4)
INT8_TOLERANCE = 3e-2  # golden int8 outputs come from ONNX Runtime, which quantizes activations


@cache
def _load(path: Path) -> edgeseq.Model:
    return edgeseq.load(path)


def _tolerance(path: Path) -> float:
    return INT8_TOLERANCE if "int8" in path.stem else TOLERANCE


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_every_reference_model_reproduces_its_golden_outputs(path):
    golden = np.load(path.with_suffix(".golden.npz"))
    model = _load(path)
    outputs = model.run({name: golden[name] for name in model.graph.inputs})
    for name, value in outputs.items():
        np.testing.assert_allclose(value, golden[name], rtol=0, atol=_tolerance(path), err_msg=name)


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_streaming_every_reference_model_equals_its_whole_sequence_run(path):
    model = _load(path)
    x = np.load(path.with_suffix(".golden.npz"))["x"][:1]
    whole = model.run({model.inputs.x: x})[model.graph.outputs[0]]
    streamed = model.stream().feed(x[0])
    expected = whole[0].reshape(streamed.shape)
    np.testing.assert_allclose(streamed, expected, rtol=0, atol=_tolerance(path))


def _samples(model: edgeseq.Model, steps: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((steps, model.n_features)).astype(np.float32)


@pytest.mark.parametrize("path", CELL_MODELS, ids=lambda p: p.stem)
def test_stepping_resetting_and_restoring_state_agree_with_feeding(path):
    model = _load(path)
    xs = _samples(model, 30, 0)
    fed = model.stream().feed(xs)
    stream = model.stream()
    stepped = np.stack([stream.step(x) for x in xs[:15]])
    saved = stream.state
    stepped_rest = stream.feed(xs[15:])
    np.testing.assert_array_equal(np.concatenate([stepped, stepped_rest]), fed)
    other = model.stream()
    other.state = saved
    np.testing.assert_array_equal(other.feed(xs[15:]), fed[15:])
    stream.reset()
    np.testing.assert_array_equal(stream.step(xs[0]), fed[0])


def test_the_bundled_models_own_kernel_equals_the_interpreter_on_this_cpu():
    """The per-model kernel (specialize.py) of the model a bundle ships, which install.sh's
    warmup compiled; the other models stream through it too unless EDGESEQ_SPECIALIZE=0
    (the emulated run sets it: compiling a dozen kernels under QEMU takes far too long)."""
    from edgeseq.runtime.kernels import interpreter as kernels
    from edgeseq.runtime.planning.specialize import compile_kernel, work_size

    plan = _load(ROOT / "export" / "pump-lstm.onnx").plan
    assert plan is not None
    xs = _samples(_load(ROOT / "export" / "pump-lstm.onnx"), 200, 3)
    state, scratch = plan.initial_state.copy(), np.zeros((3, plan.width), np.float32)
    expected = np.zeros((len(xs), plan.n_outputs), np.float32)
    assert kernels.feed(plan.code, plan.params, xs, state, scratch, expected) == -1
    work = np.zeros(work_size(plan), np.float32)
    work[: plan.state_size] = plan.initial_state
    got = np.zeros(expected.size, np.float32)
    assert compile_kernel(plan)(plan.params, xs.reshape(-1), work, got) == -1
    np.testing.assert_array_equal(got.reshape(expected.shape), expected)
    np.testing.assert_array_equal(work[: plan.state_size], state)


@pytest.mark.parametrize("path", CELL_MODELS, ids=lambda p: p.stem)
def test_a_pool_of_streams_equals_separate_streams(path):
    model = _load(path)
    xs = np.stack([_samples(model, 12, seed) for seed in range(4)], axis=1)  # (T, N, F)
    pool = model.pool(capacity=4)
    ids = [f"s{i}" for i in range(4)]
    pooled = np.stack([pool.step(ids, xs[t]) for t in range(xs.shape[0])], axis=1)
    for i in range(4):
        np.testing.assert_allclose(pooled[i], model.stream().feed(xs[:, i]), rtol=0, atol=TOLERANCE)


def test_a_large_lstm_pool_step_on_every_core_equals_separate_streams():
    """From 512 streams an LSTM pool step runs each thread's share through numpy's OpenBLAS,
    called by symbol from inside the kernel (lstm_shares.py): the one place the runtime calls a
    native library directly, so it is proven on this CPU's numpy too."""
    import numba

    from edgeseq.runtime.pools import blas

    model, streams = edgeseq.load(CELL_MODELS[1]), 520
    if np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"] == "scipy-openblas":
        assert blas.AVAILABLE  # numpy's own wheels: their ILP64 OpenBLAS is callable
    runner, calls = model._engine.gemm, []
    assert model._engine._uses_gemm(streams) and runner.has_lstm
    if blas.AVAILABLE and numba.get_num_threads() >= 2:
        layer = runner.lstm_layer
        assert layer is not None

        def counted(*args):
            calls.append(blas.threads())
            return layer(*args)

        runner.lstm_layer = counted
    xs = np.stack([_samples(model, 3, seed) for seed in range(streams)], axis=1)  # (T, N, F)
    before = blas.threads()
    pool, ids = model.pool(capacity=streams), [f"s{i}" for i in range(streams)]
    pooled = np.stack([pool.step(ids, xs[t]) for t in range(xs.shape[0])], axis=1)
    assert blas.threads() == before
    lstm_layers = sum(layer.cell == "lstm" for layer in model.plan.layers)
    assert calls == ([1] * xs.shape[0] * lstm_layers if runner.lstm_layer is not None else [])
    for i in (0, 261, streams - 1):
        np.testing.assert_allclose(pooled[i], model.stream().feed(xs[:, i]), rtol=0, atol=TOLERANCE)


def test_the_daemon_answers_over_tcp_exactly_as_offline_streams():
    path = ROOT / "export" / "pump-lstm.onnx"
    model = _load(path)
    streams = {f"sensor-{i}": _samples(model, 25, 10 + i) for i in range(3)}
    with DaemonProcess(str(path), "--listen", "tcp://127.0.0.1:0") as daemon:
        client = LineClient(daemon.tcp_port, timeout=120)
        for seq in range(25):
            for sid, xs in streams.items():
                client.send({"id": sid, "seq": seq, "x": xs[seq].tolist()})
        client.flush()
        answers: dict[str, list[float]] = {sid: [] for sid in streams}
        for _ in range(25 * len(streams)):
            answer = client.receive()
            assert "y" in answer, answer
            answers[answer["id"]].append(answer["y"])
        client.close()
        assert daemon.stop(timeout=120) == 0
    for sid, xs in streams.items():
        np.testing.assert_allclose(
            np.array(answers[sid]), model.stream().feed(xs), rtol=0, atol=1e-6
        )


def test_every_kernel_is_cached_under_a_stamp_of_the_whole_runtime_so_upgrades_recompile():
    """A kernel's machine code holds what it inlined from other files (cells, fastmath), so its
    cache entry must go stale when any runtime source changes, not only its own file
    (kernel_cache.py; tests/runtime/test_kernel_cache.py proves the effect on the host)."""
    from edgeseq.runtime.kernels import interpreter as kernels
    from edgeseq.runtime.kernels import kernel_cache
    from edgeseq.runtime.pools import gate_rows

    for kernel in (kernels.step, kernels.step_rows_parallel, gate_rows.lstm_rows):
        locator = kernel._cache._impl.locator
        assert isinstance(locator, kernel_cache._StampedMixin), (kernel, type(locator))
        assert locator.get_source_stamp()[1] == kernel_cache.runtime_digest()
