"""Large LSTM pool steps run each thread's share of the streams through numpy's OpenBLAS, called
from inside a Numba kernel (blas.py, lstm_shares.py); they must answer what the plain BLAS path
and separate streams answer, and leave OpenBLAS's own thread count as it was."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numba
import numpy as np
import pytest

import edgeseq
from edgeseq import config
from edgeseq.runtime.pools import blas
from edgeseq.runtime.pools.gemm import BatchRunner

ROOT = Path(__file__).resolve().parents[2]
TWO_LAYERS = ROOT / "export" / "bench-lstm.onnx"  # 8 inputs, 2 LSTM layers of 64, a dense head


def test_numpy_s_openblas_is_callable_from_kernels_here():
    """numpy's PyPI wheels ship an ILP64 OpenBLAS; without it the tests below would only
    exercise the fallback, so with such a numpy its absence is a failure, not a skip."""
    blas_name = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    if blas_name not in ("scipy-openblas", "openblas64"):
        pytest.skip(f"numpy was built against {blas_name}, not its own ILP64 OpenBLAS")
    assert blas.AVAILABLE


needs_shares = pytest.mark.skipif(
    not blas.AVAILABLE or numba.get_num_threads() < 2, reason="needs OpenBLAS and two threads"
)


def _table(plan, streams: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    table = np.tile(plan.initial_state, (streams, 1))
    return table + rng.standard_normal(table.shape).astype(np.float32) * 0.5


@needs_shares
@pytest.mark.parametrize("batch", [601, 1024])
def test_an_lstm_step_in_shares_equals_the_one_pass_blas_step(batch):
    """Shuffled rows (a gather by index) and a batch that does not split evenly; several steps,
    so state written by one step is read by the next."""
    plan = edgeseq.load(TWO_LAYERS).plan
    shares, plain = BatchRunner(plan), BatchRunner(plan)
    plain.lstm_layer = None
    assert shares.lstm_layer is not None and shares.parts == numba.get_num_threads()
    rng = np.random.default_rng(batch)
    rows = rng.permutation(batch + 7)[:batch].astype(np.int64)
    table_a = _table(plan, batch + 7, seed=1)
    table_b = table_a.copy()
    for _ in range(4):
        xs = rng.standard_normal((batch, plan.n_features)).astype(np.float32)
        kept = xs.copy()
        got, want = shares.step(xs, table_a, rows), plain.step(xs, table_b, rows)
        np.testing.assert_array_equal(xs, kept)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        np.testing.assert_allclose(table_a, table_b, rtol=0, atol=1e-6)
    untouched = np.setdiff1d(np.arange(batch + 7), rows)
    np.testing.assert_array_equal(table_a[untouched], _table(plan, batch + 7, seed=1)[untouched])


@pytest.fixture
def three_blas_threads():
    """OpenBLAS at 3 threads (not the 1 that single_threaded sets, nor a default that might be
    1, as under the systemd unit's OPENBLAS_NUM_THREADS=1), restored after."""
    before = blas.threads()
    blas._set_threads(3)
    yield
    blas._set_threads(before)


@needs_shares
def test_a_pool_step_in_shares_leaves_openblas_s_thread_count_as_it_was(three_blas_threads):
    model = edgeseq.load(TWO_LAYERS)
    seen: list[int] = []
    runner = model._engine.gemm
    layer = runner.lstm_layer

    def watched(*args):
        seen.append(blas.threads())
        return layer(*args)

    runner.lstm_layer = watched
    pool = model.pool(capacity=1024)
    pool.step([f"s{i}" for i in range(1024)], np.zeros((1024, 8), np.float32))
    assert seen == [1, 1]  # one call per layer, OpenBLAS on one thread under Numba's
    assert blas.threads() == 3


@needs_shares
def test_a_failing_step_in_shares_still_restores_openblas_s_thread_count(three_blas_threads):
    runner = BatchRunner(edgeseq.load(TWO_LAYERS).plan)

    def failing(*args):
        raise RuntimeError("in the kernel")

    runner.lstm_layer = failing
    table = _table(runner.plan, 600, seed=0)
    with pytest.raises(RuntimeError, match="in the kernel"):
        runner.step(np.zeros((600, 8), np.float32), table, np.arange(600))
    assert blas.threads() == 3


@needs_shares
def test_the_layer_kernel_refuses_operands_that_sgemm_would_misread():
    from edgeseq.runtime.pools.lstm_shares import lstm_layer

    n, n_in, hid = 64, 8, 16
    rows = np.arange(n)
    table = np.zeros((n, 2 * hid), np.float32)
    cur, bias = np.zeros((n, n_in), np.float32), np.zeros(4 * hid, np.float32)
    h_out, gates = np.empty((n, hid), np.float32), np.empty((n, 4 * hid), np.float32)
    weights = np.zeros((n_in + hid, 4 * hid), np.float32)
    xh = np.empty((n, n_in + hid), np.float32)
    lstm_layer(cur, weights, bias, table, rows, 0, hid, xh, gates, h_out, 2)  # as it should be
    for bad in (
        dict(weights=np.zeros((n_in + hid + 1, 4 * hid), np.float32)),  # K disagrees
        dict(gates=np.empty((n, 4 * hid), np.float32)[:, ::1][::2]),  # too few rows
        dict(weights=np.asfortranarray(weights)),  # not row-major
        dict(xh=np.empty((n, 2 * (n_in + hid)), np.float32)[:, ::2]),  # strided rows
    ):
        args = dict(weights=weights, xh=xh, gates=gates) | bad
        with pytest.raises(ValueError, match="disagreeing shapes, or not C-contiguous"):
            lstm_layer(cur, args["weights"], bias, table, rows, 0, hid, args["xh"],
                       args["gates"], h_out, 2)  # fmt: skip


def test_the_shares_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(config, "ENV", dataclasses.replace(config.ENV, lstm_shares=False))
    runner = BatchRunner(edgeseq.load(TWO_LAYERS).plan)
    assert runner.lstm_layer is None and runner.parts == 1
