"""Compile every kernel once so the Numba cache holds them for this CPU (`edgeseq warmup`).

The generic kernels' types do not depend on the model (float32 and int64 arrays), so each
compiles for one fixed signature; they compile in parallel, one process per core, which on a
small board (or under emulation) turns minutes into fewer minutes. Then a tiny LSTM built here,
and the given models, run through every path (a stream, and pools on one thread, on every
thread and through BLAS) so that loading, planning, each model's own kernels and stepping all
hit the cache. The cache is keyed to the CPU, which is why a board runs this itself after
installing rather than receiving a cache built elsewhere.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeseq.config import GEMM_BATCH, GEMM_BATCH_CACHED, PARALLEL_ROWS
from edgeseq.runtime.model import Model, load
from edgeseq.runtime.pools import blas


def lstm_file(path: Path, features: int = 2, hidden: int = 2) -> None:
    """A one-layer LSTM of random weights at `path` (a shape to warm, or to time compiling)."""
    rng = np.random.default_rng(0)
    scale = 1.0 / np.sqrt(hidden)
    weights = [
        numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)
        for name, shape in (("W", (1, 4 * hidden, features)), ("R", (1, 4 * hidden, hidden)),
                            ("B", (1, 8 * hidden)))
    ]  # fmt: skip
    node = helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], hidden_size=hidden)
    graph = helper.make_graph(
        [node], "warmup",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["time", "batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["time", 1, "batch", hidden])],
        weights,
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _signatures() -> dict[tuple[str, str], tuple[Any, ...]]:
    """(module, kernel) -> the one signature every model uses."""
    from numba import types

    i1, i2 = types.Array(types.int64, 1, "C"), types.Array(types.int64, 2, "C")
    f1, f2, f3 = (types.Array(types.float32, n, "C") for n in (1, 2, 3))
    rows = (i2, f1, f2, f2, i1, f3, f2)
    i = types.int64
    shares = {("pools.lstm_shares", "lstm_layer"): (f2, f2, f1, f2, i1, i, i, f2, f2, f2, i)}
    return (shares if blas.AVAILABLE else {}) | {
        ("kernels.interpreter", "step"): (i2, f1, f1, f1, f2, f1),
        ("kernels.interpreter", "feed"): (i2, f1, f2, f1, f2, f2),
        ("kernels.interpreter", "step_rows"): rows,
        ("kernels.interpreter", "step_rows_parallel"): rows,
        ("pools.gate_rows", "lstm_rows"): (f2, f1, f2, i1, types.int64, types.int64, f2),
        ("pools.gate_rows", "gru_cells"): (f2, f2, f2),
        ("pools.gate_rows", "activate_rows"): (f2, types.int64, types.float32),
    }


def _compile(key: tuple[str, str]) -> str:
    """In a worker process: compile one kernel into the cache."""
    import importlib

    module = importlib.import_module(f"edgeseq.runtime.{key[0]}")
    getattr(module, key[1]).compile(_signatures()[key])
    return key[1]


def compile_all(processes: int | None = None) -> list[str]:
    """Every kernel compiled (or found in the cache), in parallel processes."""
    keys = list(_signatures())
    workers = max(1, min(len(keys), processes or os.cpu_count() or 1))
    if workers == 1:
        return [_compile(key) for key in keys]
    context = multiprocessing.get_context("spawn")  # never fork a process holding LLVM
    with context.Pool(workers) as pool:
        return pool.map(_compile, keys, chunksize=1)


def warm(models: list[Path]) -> list[str]:
    """Compile every kernel, then load, plan, verify and run `models` (and a tiny LSTM) through
    every path; returns the kernels' names."""
    loaded = [load(path) for path in models]  # a wrong path fails now, not after compiling
    names = compile_all()
    with tempfile.TemporaryDirectory() as tmp:
        lstm_file(Path(tmp) / "tiny.onnx")
        for model in [load(Path(tmp) / "tiny.onnx"), *loaded]:
            stream = model.stream()
            stream.step(np.zeros(model.n_features, np.float32))
            stream.feed(np.zeros((2, model.n_features), np.float32))
            step_every_pool_path(model)
    return names


POOL_PATHS = (1, PARALLEL_ROWS, GEMM_BATCH, GEMM_BATCH_CACHED)  # one thread, all, BLAS (x2)


def step_every_pool_path(model: Model) -> None:
    """Step a throwaway pool at a batch size of each path StreamPool.step can take, so their
    kernels are compiled or loaded from the cache now, not inside someone's first request."""
    sizes = POOL_PATHS if model.backend == "numba" else POOL_PATHS[:1]
    pool, ids = model.pool(capacity=sizes[-1]), [f"warm-up-{i}" for i in range(sizes[-1])]
    for batch in sizes:
        pool.step(ids[:batch], np.zeros((batch, model.n_features), np.float32))
