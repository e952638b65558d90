"""`edgeseq.load`: an ONNX file -> a validated Model with streams, pools and `run`.

Backends: "numba" (default; the fused plan in Numba kernels when one is found and proven equal
to the graph, else the NumPy graph stepper), "numpy" (the plain reference) and "onnxruntime".
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from edgeseq import config
from edgeseq.artifact import LAG_INPUT, METADATA_KEY, ArtifactInfo, read_metadata, sample_feeds
from edgeseq.errors import EdgeseqError, ModelFormatError, ShapeError, UsageError
from edgeseq.runtime.engines import Engine, GraphEngine, KernelEngine, OrtEngine, as_real
from edgeseq.runtime.graphs.graph import LOAD_LIMITS, Graph, limited
from edgeseq.runtime.graphs.inputs import find_baked_steps, read_inputs
from edgeseq.runtime.graphs.reading import read_model
from edgeseq.runtime.planning.plan import NoPlan, Plan, build_plan
from edgeseq.runtime.planning.verify import own_kernel_only, verify
from edgeseq.runtime.stream import Stream, StreamPool

BACKENDS = ("numba", "onnxruntime", "numpy")
PLAN_TOLERANCE = 1e-4  # relative gap allowed between a fused plan and the graph it replaces
VERIFY_SHAPES = ((1, 7), (3, 19))  # (batch, steps): two batch sizes, two sequence lengths


class Model:
    """A loaded model: `stream()`, `pool(capacity)` and `run(feeds)`."""

    def __init__(self, path: str | Path, backend: str = "numba") -> None:
        if backend not in BACKENDS:
            raise UsageError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
        self.backend = backend
        self.path = Path(path)
        with limited(LOAD_LIMITS):  # probing a hostile file must not allocate what it declares
            self._load()

    def _load(self) -> None:
        backend = self.backend
        proto, raw = read_model(self.path)
        self.fingerprint = hashlib.sha256(raw).hexdigest()
        self.graph = Graph(proto, str(self.path))
        self.info: ArtifactInfo | None = None
        if any(p.key == METADATA_KEY for p in proto.metadata_props):
            self.info = read_metadata(proto, str(self.path))
        self.inputs = read_inputs(proto, self.graph, str(self.path))
        self.n_features, self.time_first = self.inputs.n_features, self.inputs.time_first
        if self.info is not None and self.info.model_spec.input_size != self.n_features:
            raise ModelFormatError(
                f"{self.path}: edgeseq metadata: model_spec.input_size is "
                f"{self.info.model_spec.input_size}, but the graph's input takes "
                f"{self.n_features} features"
            )
        self.plan_note, self._proto = "", proto
        self.plan: Plan | None = None
        self.n_outputs = self._count_outputs()
        self._engine: Engine | None = None
        self._session = self._ort_session() if backend == "onnxruntime" else None
        self._no_stream = self._why_not_streamable()
        if self._no_stream is None:
            try:
                self._engine = self._make_engine(backend)
            except ModelFormatError as exc:
                self._no_stream = str(exc)

    def _why_not_streamable(self) -> str | None:
        for node in self.graph.recurrent_nodes:
            direction = node.attrs.get("direction", "forward")
            if direction != "forward":
                return (f"{self.path}: node {node.name!r} runs {direction}: its output at step t "
                        "depends on samples after t, so it cannot stream one sample at a time "
                        "(use Model.run on whole sequences)")  # fmt: skip
        steps = self.inputs.fixed_steps
        if steps is not None and steps != 1:
            inside = (" (a shape inside the graph fixes it, though the input declares a dynamic "
                      "time axis: torch.onnx.export may freeze the example's length)"
                      if self.inputs.baked_steps else "")  # fmt: skip
            return (f"{self.path}: the graph was exported for sequences of exactly {steps} "
                    f"steps{inside}, so it cannot take one sample at a time; use Model.run, or "
                    "re-export it with a dynamic time axis")  # fmt: skip
        batch = self.inputs.fixed_batch
        if batch is not None and batch != 1:
            return (f"{self.path}: input {self.inputs.x!r} declares a fixed batch of {batch} "
                    "sequences, so it cannot take one stream's sample at a time; use Model.run, "
                    "or re-export it with a dynamic (or 1) batch axis")  # fmt: skip
        return None

    def _x(self, batch: int, steps: int, rng: np.random.Generator) -> np.ndarray:
        if self.info is not None:  # spread like the training data (artifact.sample_feeds)
            seed = int(rng.integers(1 << 31))
            x = sample_feeds(self.info.model_spec, self.info.data_spec, batch, steps, seed)["x"]
        else:
            x = rng.standard_normal((batch, steps, self.n_features)).astype(np.float32)
        return self.inputs.layout(x)

    def _try_plan(self) -> Plan | None:
        try:
            data = self.info.data_spec if self.info is not None else None
            transform = data.target_transform if data is not None else None
            plan = build_plan(self.graph, self.n_features, transform,
                              len(data.targets) if data is not None else 0)  # fmt: skip
            if own_kernel_only(plan) and not config.ENV.specialize:
                raise NoPlan("its ops (clip, activations, peepholes, int8 weights, a seq2seq "
                             "decoder...) run only in the model's own kernel, and "
                             "EDGESEQ_SPECIALIZE=0")  # fmt: skip
            rng = np.random.default_rng(0)
            feeds = [self.inputs.feeds(self._x(b, t, rng)) for b, t in VERIFY_SHAPES]
            gap = verify(plan, self.graph, feeds, self.time_first)
        except NoPlan as why:
            self.plan_note = f"no fused plan: {why}"
            return None
        except (EdgeseqError, ValueError, IndexError) as exc:
            self.plan_note = f"fused plan refused: checking it failed ({type(exc).__name__}: {exc})"
            return None
        if gap > PLAN_TOLERANCE:
            self.plan_note = (f"fused plan refused: it differs from the graph by {gap:.3g} "
                              f"(relative; limit {PLAN_TOLERANCE:g})")  # fmt: skip
            return None
        self.plan_note = f"fused plan verified against the graph (max relative gap {gap:.2g})"
        return plan

    def _one_sample_inputs(self) -> dict[str, np.ndarray]:
        feeds = self.inputs.feeds(np.zeros((1, 1, self.n_features), np.float32))
        del feeds[self.inputs.x]
        return feeds

    def _make_engine(self, backend: str) -> Engine:
        if backend == "onnxruntime":
            self.plan_note = "no fused plan: the onnxruntime backend runs the graph in ONNX Runtime"
            return self._ort_engine()
        if backend == "numba":
            self.plan = self._try_plan()
            if self.plan is not None:
                return KernelEngine(self.plan)
        else:
            self.plan_note = "no fused plan: the numpy backend evaluates the graph with NumPy"
        return GraphEngine(self.graph, self._one_sample_inputs(), self.n_features,
                           self.n_outputs, self.time_first, self._carried_pairs())  # fmt: skip

    def _carried_pairs(self) -> list[tuple[str, str]]:
        """State pairs no recurrent node carries (a target transform's lag0 -> lagn)."""
        return [(i, o) for i, o in (self.info.state_pairs if self.info else []) if i == LAG_INPUT]

    def _count_outputs(self) -> int:
        try:
            return self._outputs_per_step()
        except EdgeseqError:
            if self.inputs.fixed_steps is not None or not find_baked_steps(
                self._proto, self.graph, self.inputs
            ):
                raise
            return self._outputs_per_step()

    def _outputs_per_step(self) -> int:
        """Numbers in the first output for one sample (one step of one sequence)."""
        steps, batch = self.inputs.fixed_steps or 1, self.inputs.fixed_batch or 1
        y = self.graph.evaluate(self.inputs.feeds(self.inputs.zeros(steps)))[self.graph.outputs[0]]
        per_sequence = int(y.size) // batch
        return per_sequence // steps if y.ndim >= 3 else per_sequence  # all steps, or the last

    def _ort_session(self) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            return ort.InferenceSession(self._proto.SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])  # fmt: skip
        except Exception as exc:  # ORT raises its own classes (Fail, NotImplemented, ...)
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise ModelFormatError(
                f"{self.path}: ONNX Runtime cannot run this graph ({reason}); the 'numba' and "
                "'numpy' backends can"
            ) from None

    def _ort_engine(self) -> Engine:
        pairs = self.info.state_pairs if self.info else []
        return OrtEngine(self._session, pairs, self._one_sample_inputs(), self.n_features,
                         self.n_outputs, self.time_first)  # fmt: skip

    def _streaming_engine(self) -> Engine:
        if self._engine is None:
            raise ModelFormatError(self._no_stream or f"{self.path}: this model cannot stream")
        if isinstance(self._engine, OrtEngine) and not self._engine.pairs:
            raise UsageError(
                f"{self.path}: without edgeseq's state metadata the onnxruntime backend cannot "
                "carry state; use backend='numba' or 'numpy'"
            )
        return self._engine

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The inputs' names in order, from the edgeseq metadata (() without it): a sample may
        be a mapping of these names to values, `stream.step({"pressure": 2.5, ...})`."""
        return tuple(self.info.data_spec.features) if self.info is not None else ()

    def stream(self) -> Stream:
        """A stream with its own state, starting from the model's initial state."""
        return Stream(self._streaming_engine(), self.n_features, self.feature_names)

    def pool(self, capacity: int = 1024) -> StreamPool:
        """Many named streams; its `fingerprint` names this model file (for state snapshots)."""
        pool = StreamPool(self._streaming_engine(), self.n_features, capacity)
        pool.fingerprint = self.fingerprint
        return pool

    @property
    def pool_note(self) -> str:
        """How a pool step runs on this backend (proving, the first time, that the onnxruntime
        and numpy engines may stack their streams into one call; stacked.py)."""
        return self._streaming_engine().pool_note()

    def run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        """Evaluate the whole graph like onnxruntime's InferenceSession.run (all outputs)."""
        unknown = sorted(set(feeds) - set(self.graph.inputs))
        if unknown:
            raise ShapeError(f"unknown inputs {unknown}; the model takes {self.graph.inputs}")
        if self.inputs.x not in feeds:
            raise ShapeError(f"input {self.inputs.x!r} is required")
        arrays = {k: _as_input(v, self.inputs.dtypes[k], k) for k, v in feeds.items()}
        x = arrays[self.inputs.x]
        if x.ndim != 3 or x.shape[2] != self.n_features or not np.isfinite(x).all():
            raise ShapeError(f"{self.inputs.x!r} has shape {x.shape}; expected 3-D with "
                             f"{self.n_features} features, finite values")  # fmt: skip
        full = {**self.inputs.feeds(x), **arrays}
        if self._session is not None:
            values = self._session.run(self.graph.outputs, full)
            return dict(zip(self.graph.outputs, values, strict=True))
        env = self.graph.evaluate(full)
        return {name: env[name] for name in self.graph.outputs}


def _as_input(value: Any, dtype: np.dtype, name: str) -> np.ndarray:
    try:
        return as_real(value, dtype)
    except ShapeError as exc:
        raise ShapeError(f"input {name!r}: {exc}") from None


def load(path: str | Path, backend: str = "numba") -> Model:
    """Load, validate and plan an ONNX recurrent model (see Model)."""
    return Model(path, backend)
