"""`edgeseq.load`: an ONNX file -> a validated Model with streams, pools and `run`.

Backends: "numba" (default; the fused plan in Numba kernels when one is found and proven equal
to the graph, else the NumPy graph stepper), "numpy" (the plain reference) and "onnxruntime".
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeseq.artifact import METADATA_KEY, ArtifactInfo, read_metadata
from edgeseq.errors import ModelFormatError, ShapeError, UsageError
from edgeseq.runtime.engines import Engine, GraphEngine, KernelEngine, OrtEngine
from edgeseq.runtime.graph import Graph
from edgeseq.runtime.loader import read_model
from edgeseq.runtime.plan import NoPlan, Plan, batch_time_axes, build_plan, verify
from edgeseq.runtime.stream import Stream, StreamPool

BACKENDS = ("numba", "onnxruntime", "numpy")
PLAN_TOLERANCE = 1e-4  # relative gap allowed between a fused plan and the graph it replaces
VERIFY_SHAPES = ((1, 7), (3, 19))  # (batch, steps): two batch sizes, two sequence lengths


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [
        d.dim_value if d.dim_value > 0 else (d.dim_param or "?")
        for d in value.type.tensor_type.shape.dim
    ]


class Model:
    """A loaded model: `stream()`, `pool(capacity)` and `run(feeds)`."""

    def __init__(self, path: str | Path, backend: str = "numba") -> None:
        if backend not in BACKENDS:
            raise UsageError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
        self.path = Path(path)
        proto, raw = read_model(self.path)
        self.fingerprint = hashlib.sha256(raw).hexdigest()
        self.graph = Graph(proto, str(self.path))
        self.info: ArtifactInfo | None = None
        if any(p.key == METADATA_KEY for p in proto.metadata_props):
            self.info = read_metadata(proto, str(self.path))
        self._input_dims = {i.name: _dims(i) for i in proto.graph.input}
        x_dims = self._input_dims[self.graph.inputs[0]]
        if len(x_dims) != 3 or not isinstance(x_dims[2], int):
            raise ModelFormatError(
                f"{self.path}: input {self.graph.inputs[0]!r} has dims {x_dims}; expected "
                "[batch, time, features] (or [time, batch, features]) with a fixed feature count"
            )
        self.n_features = int(x_dims[2])
        batch_axis, _ = batch_time_axes(x_dims)
        self.time_first = batch_axis == 1
        self.backend, self.plan_note = backend, ""
        self.plan: Plan | None = None
        self._proto = proto
        self._engine = self._make_engine(backend)

    def _zeros(self, batch: int) -> dict[str, np.ndarray]:
        feeds = {}
        for name in self.graph.inputs[1:]:
            dims = [d if isinstance(d, int) else batch for d in self._input_dims[name]]
            feeds[name] = np.zeros(dims, np.float32)
        return feeds

    def _x(self, batch: int, steps: int, rng: np.random.Generator) -> np.ndarray:
        x = rng.standard_normal((batch, steps, self.n_features)).astype(np.float32)
        if self.info is not None:
            scaling = self.info.data_spec.input_scaling
            x = x * np.asarray(scaling.std, np.float32) + np.asarray(scaling.mean, np.float32)
        return np.ascontiguousarray(np.moveaxis(x, 0, 1) if self.time_first else x)

    def _try_plan(self) -> Plan | None:
        try:
            plan = build_plan(self.graph, self.n_features)
        except NoPlan as why:
            self.plan_note = f"no fused plan: {why}"
            return None
        rng = np.random.default_rng(0)
        feeds = [
            {self.graph.inputs[0]: self._x(b, t, rng), **self._zeros(b)} for b, t in VERIFY_SHAPES
        ]
        gap = verify(plan, self.graph, feeds, self.time_first)
        if gap > PLAN_TOLERANCE:
            self.plan_note = (
                f"fused plan refused: it differs from the graph by {gap:.3g} "
                f"(relative; limit {PLAN_TOLERANCE:g})"
            )
            return None
        self.plan_note = f"fused plan verified against the graph (max relative gap {gap:.2g})"
        return plan

    def _make_engine(self, backend: str) -> Engine:
        n_outputs = self._count_outputs()
        if backend == "onnxruntime":
            return self._ort_engine(n_outputs)
        if backend == "numba":
            self.plan = self._try_plan()
            if self.plan is not None:
                return KernelEngine(self.plan)
        return GraphEngine(self.graph, self._zeros(1), self.n_features, n_outputs, self.time_first)

    def _count_outputs(self) -> int:
        probe = {
            self.graph.inputs[0]: np.zeros((1, 1, self.n_features), np.float32),
            **self._zeros(1),
        }
        return int(self.graph.evaluate(probe)[self.graph.outputs[0]].size)

    def _ort_engine(self, n_outputs: int) -> Engine:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(
            self._proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        pairs = self.info.state_pairs if self.info else []
        return OrtEngine(session, pairs, self._zeros(1), n_outputs)

    @property
    def n_outputs(self) -> int:
        return self._engine.n_outputs

    def stream(self) -> Stream:
        """A stream with its own state, starting from the model's initial state."""
        if isinstance(self._engine, OrtEngine) and not self._engine.pairs:
            raise UsageError(
                f"{self.path}: without edgeseq's state metadata the onnxruntime "
                "backend cannot carry state; use backend='numba' or 'numpy'"
            )
        return Stream(self._engine, self.n_features)

    def pool(self, capacity: int = 1024) -> StreamPool:
        """Many named streams; its `fingerprint` names this model file (for state snapshots)."""
        pool = StreamPool(self._engine, self.n_features, capacity)
        pool.fingerprint = self.fingerprint
        return pool

    def run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        """Evaluate the whole graph like onnxruntime's InferenceSession.run (all outputs)."""
        unknown = sorted(set(feeds) - set(self.graph.inputs))
        if unknown:
            raise ShapeError(f"unknown inputs {unknown}; the model takes {self.graph.inputs}")
        arrays = {k: np.asarray(v, np.float32) for k, v in feeds.items()}
        if self.graph.inputs[0] not in arrays:
            raise ShapeError(f"input {self.graph.inputs[0]!r} is required")
        x = arrays[self.graph.inputs[0]]
        if x.ndim != 3 or x.shape[2] != self.n_features or not np.isfinite(x).all():
            raise ShapeError(
                f"{self.graph.inputs[0]!r} has shape {x.shape}; expected 3-D with "
                f"{self.n_features} features, finite values"
            )
        batch = x.shape[1] if self.time_first else x.shape[0]
        full = {**self._zeros(batch), **arrays}
        if isinstance(self._engine, OrtEngine):
            values = self._engine.session.run(self.graph.outputs, full)
            return dict(zip(self.graph.outputs, values, strict=True))
        env = self.graph.evaluate(full)
        return {name: env[name] for name in self.graph.outputs}


def load(path: str | Path, backend: str = "numba") -> Model:
    """Load, validate and plan an ONNX recurrent model (see Model)."""
    return Model(path, backend)
