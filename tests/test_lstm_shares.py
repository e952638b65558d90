"""Large LSTM pool steps run each thread's share of the streams through numpy's OpenBLAS, called
from inside a Numba kernel (blas.py, lstm_shares.py); they must answer what the plain BLAS path
and separate streams answer, and leave OpenBLAS's own thread count as it was."""

from __future__ import annotations

import platform
from pathlib import Path

import numba
import numpy as np
import pytest

import edgeseq
from edgeseq.runtime import blas
from edgeseq.runtime.gemm import SHARES_ENV, BatchRunner

ROOT = Path(__file__).resolve().parents[1]
TWO_LAYERS = ROOT / "export" / "bench-lstm.onnx"  # 8 inputs, 2 LSTM layers of 64, a dense head


def test_numpy_s_openblas_is_callable_from_kernels_here():
    """numpy's Linux wheels ship an ILP64 OpenBLAS; without it the tests below would only
    exercise the fallback, so on Linux its absence is a failure, not a skip."""
    if platform.system() != "Linux":
        pytest.skip("numpy's BLAS elsewhere may be another library")
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


@needs_shares
def test_a_pool_step_in_shares_leaves_openblas_s_thread_count_as_it_was():
    model = edgeseq.load(TWO_LAYERS)
    before = blas.threads()
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
    assert blas.threads() == before


def test_the_shares_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(SHARES_ENV, "0")
    runner = BatchRunner(edgeseq.load(TWO_LAYERS).plan)
    assert runner.lstm_layer is None and runner.parts == 1
