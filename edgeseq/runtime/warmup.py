"""Compile every kernel once so the Numba cache holds them for this CPU (`edgeseq warmup`).

The kernels' types do not depend on the model (float32 and int64 arrays), so a tiny LSTM built
here in memory compiles them all; the cache is keyed to the CPU, which is why a board runs this
itself after installing rather than receiving a cache built elsewhere.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeseq.runtime import kernels
from edgeseq.runtime.model import load


def _tiny_lstm(path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        for name, shape in (("W", (1, 8, 2)), ("R", (1, 8, 2)), ("B", (1, 16)))
    ]
    node = helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], hidden_size=2)
    graph = helper.make_graph(
        [node], "warmup",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["time", "batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["time", 1, "batch", 2])],
        weights,
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def warm(models: list[Path]) -> list[str]:
    """Run every kernel once (and load, plan and verify `models`); returns the kernels' names."""
    with tempfile.TemporaryDirectory() as tmp:
        _tiny_lstm(Path(tmp) / "tiny.onnx")
        paths = [Path(tmp) / "tiny.onnx", *models]
        for path in paths:
            model = load(path)
            stream = model.stream()
            stream.step(np.zeros(model.n_features, np.float32))
            stream.feed(np.zeros((2, model.n_features), np.float32))
            pool = model.pool(capacity=300)
            ids = [str(i) for i in range(300)]
            pool.step(ids[:2], np.zeros((2, model.n_features), np.float32))
            pool.step(ids, np.zeros((300, model.n_features), np.float32))  # the threaded kernel
    return ["step", "feed", "step_rows", "step_rows_parallel"] if kernels else []
