"""The three ways a stream can advance, behind one small interface.

- KernelEngine: the fused plan in Numba kernels (the fast path);
- GraphEngine: NumPy evaluation of the graph one sample at a time (the `numpy` backend, and the
  fallback for graphs without a verified plan);
- OrtEngine: ONNX Runtime with seq_len 1 and the state pairs fed back (the `onnxruntime` backend).

`step` and `feed` return the flat index of the first NaN or infinity in their input (and then
change nothing), BAD_OUTPUT when finite input drove the state or an output to NaN or infinity
(the state is then as it was before the call), or -1. A stream's state is opaque to the
engine's callers except through `export`/`restore`, which use one format for all engines:
{"<node>.h": (H,), "<node>.c": (H,)} float32 arrays.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

import numba
import numpy as np

from edgeseq import config
from edgeseq.artifact import LAG_INPUT
from edgeseq.errors import ShapeError
from edgeseq.runtime.graphs.graph import Graph
from edgeseq.runtime.graphs.stepper import step_graph, stream_time_nodes, streamable
from edgeseq.runtime.kernels import aligned, interpreter
from edgeseq.runtime.kernels.codes import BAD_OUTPUT, Kernel
from edgeseq.runtime.planning.plan import Plan
from edgeseq.runtime.planning.specialize import compile_kernel, compile_rows, work_size
from edgeseq.runtime.pools.gemm import BatchRunner
from edgeseq.runtime.pools.stacked import RunBatch, Stacker, StateColumns, state_arrays

StateDict = dict[str, np.ndarray]
# Pool steps from config.PARALLEL_BATCH / PARALLEL_ROWS streams use every thread; from
# config.GEMM_BATCH(_CACHED) streams, BLAS matrix products (weights read once for the batch) beat
# running the model's own kernel per stream on every core, later when the weights fit in a
# core's L2 cache (config.CACHED_BYTES), for then each stream reads them at cache speed.
# Pool steps that use every core, or buffers an engine keeps (BLAS, the interpreter's scratch),
# take turns across threads: each already keeps every core busy, and Numba's workqueue layer
# (used where neither OpenMP nor TBB is installed) aborts the process on concurrent launches.
_TAKE_TURNS = threading.Lock()


class StateTable(Protocol):
    """Many streams' states, one row each: a pool's storage, in the engine's own layout."""

    def put(self, row: int, state: Any) -> None: ...
    def get(self, row: int) -> Any: ...


class OwnKernel(NamedTuple):
    """A model's own compiled kernel with what one stream needs to call it (Stream's fast
    path): kernel(params, x, work, out), where work holds the state then the scratch."""

    kernel: Kernel
    params: np.ndarray
    work: np.ndarray
    state_size: int


class Engine(Protocol):
    """Everything Stream and StreamPool call: one stream's state (new_state, step, feed,
    export, restore, own_kernel) and a pool's (new_table, step_rows, undoes_overflow,
    pool_note)."""

    n_outputs: int

    def new_state(self) -> Any: ...
    def step(self, x: np.ndarray, state: Any, out: np.ndarray) -> int: ...
    def feed(self, xs: np.ndarray, state: Any, out: np.ndarray) -> int: ...
    def export(self, state: Any) -> StateDict: ...
    def restore(self, saved: StateDict) -> Any: ...
    def own_kernel(self) -> OwnKernel | None: ...
    def new_table(self, capacity: int) -> StateTable: ...
    def step_rows(
        self, xs: np.ndarray, table: StateTable, rows: np.ndarray, out: np.ndarray
    ) -> int: ...
    def undoes_overflow(self, batch: int) -> bool: ...
    def pool_note(self) -> str: ...


def first_bad(values: np.ndarray) -> int:
    """Flat index of the first NaN or infinity, or -1 (the slow engines' input check)."""
    bad = np.flatnonzero(~np.isfinite(values))
    return int(bad[0]) if bad.size else -1


def as_real(value: Any, dtype: Any = np.float32) -> np.ndarray:
    """value as an array of `dtype` when it holds real numbers (bool, int, float), else
    ShapeError naming what it holds: a cast alone would drop a complex value's imaginary part
    or read a date as a number. Values beyond float32 become infinity, which every caller then
    refuses as not finite."""
    try:
        raw = np.asarray(value)
        if raw.dtype.kind in "biuf":
            with np.errstate(over="ignore"):
                return raw.astype(dtype, copy=False)
        found = f"{raw.dtype} values"
    except (TypeError, ValueError, OverflowError) as exc:
        found = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    raise ShapeError(f"found {found}; expected real numbers")


def _kept_finite(bad: int, state: np.ndarray, saved: np.ndarray, out: np.ndarray) -> int:
    """What the specialized kernel does in itself: a call that left the state or an output NaN
    or infinite is undone (BAD_OUTPUT)."""
    if bad == -1 and not (np.isfinite(state).all() and np.isfinite(out).all()):
        state[:] = saved
        return BAD_OUTPUT
    return bad


def _finite(values: Any) -> bool:
    return all(np.isfinite(v).all() for v in values)


def _check_keys(saved: StateDict, shapes: Mapping[str, tuple[int, ...]]) -> StateDict:
    """The state as float32 arrays, checked against the model's: keys, shapes, real finite
    values (after the cast: 1e300 is no float32)."""
    if not isinstance(saved, Mapping):
        raise ShapeError(f"a state is a dict of name -> array, found {type(saved).__name__}")
    odd = next((k for k in saved if not isinstance(k, str)), None)
    if odd is not None:
        raise ShapeError(f"a state's keys are names (strings), found {odd!r:.60}")
    if set(saved) != set(shapes):
        raise ShapeError(f"state has keys {sorted(saved)}; this model's are {sorted(shapes)}")
    checked = {}
    for key, shape in shapes.items():
        try:
            value = as_real(saved[key])
        except ShapeError as exc:
            raise ShapeError(f"state {key!r}: {exc}") from None
        if value.shape != shape:
            raise ShapeError(f"state {key!r} has shape {value.shape}; expected {shape}")
        if not np.isfinite(value).all():
            raise ShapeError(f"state {key!r} holds NaN or infinity (as float32)")
        checked[key] = value
    return checked


class StateRows:
    """A kernel engine's pool table: each stream's state vector as one row of one array, and
    the pool's own work vectors (so pools of one model can step in different threads)."""

    def __init__(self, array: np.ndarray, works: np.ndarray) -> None:
        self.array, self.works = array, works

    def put(self, row: int, state: np.ndarray) -> None:
        self.array[row] = state

    def get(self, row: int) -> np.ndarray:
        return self.array[row]


class KernelEngine:
    def __init__(self, plan: Plan) -> None:
        self.plan, self.kernels = plan, interpreter
        self.n_outputs = plan.n_outputs
        self.scratch = aligned.zeros(3 * plan.width).reshape(3, plan.width)  # reused every step
        self._specialized: Kernel | None = None
        self._rows: tuple[Any, Any] | None = None  # per-model pool kernels (serial, parallel)
        self._rows_sought = False
        self.threads = numba.get_num_threads()
        self.wide_scratch = np.zeros((self.threads, 3, plan.width), np.float32)
        self.gemm = BatchRunner(plan)
        self.shapes = {f"{L.node}.h": (L.hidden,) for L in plan.layers}
        self.shapes |= {f"{L.node}.c": (L.hidden,) for L in plan.layers if L.c_offset >= 0}
        if plan.lag is not None:  # a target transform's past, named as the graph's input
            self.shapes[LAG_INPUT] = (plan.lag[1],)

    def new_state(self) -> np.ndarray:
        return self.plan.initial_state.copy()

    def _compiled(self) -> Kernel | None:
        """This model's own compiled kernel (None when EDGESEQ_SPECIALIZE=0: streams then use
        the interpreter like pools do)."""
        if not config.ENV.specialize:
            return None
        if self._specialized is None:
            self._specialized = compile_kernel(self.plan)
        return self._specialized

    def own_kernel(self) -> OwnKernel | None:
        """The kernel and a fresh work vector (one stream's state, then its own scratch)."""
        kernel = self._compiled()
        if kernel is None:
            return None
        work = aligned.zeros(work_size(self.plan))
        work[: self.plan.state_size] = self.plan.initial_state
        return OwnKernel(kernel, self.plan.params, work, self.plan.state_size)

    def step(self, x: np.ndarray, state: np.ndarray, out: np.ndarray) -> int:
        saved = state.copy()
        bad = self.kernels.step(self.plan.code, self.plan.params, x, state, self.scratch, out)
        return _kept_finite(int(bad), state, saved, out)

    def feed(self, xs: np.ndarray, state: np.ndarray, out: np.ndarray) -> int:
        saved = state.copy()
        bad = self.kernels.feed(self.plan.code, self.plan.params, xs, state, self.scratch, out)
        return _kept_finite(int(bad), state, saved, out)

    def new_table(self, capacity: int) -> StateRows:
        """Room for `capacity` streams' states, one row each, and the pool's own work vectors."""
        return StateRows(np.zeros((capacity, self.plan.state_size), np.float32), self.new_works())

    def _rows_kernels(self) -> tuple[Any, Any] | None:
        """This model's own pool kernels (serial, parallel); None when EDGESEQ_SPECIALIZE=0."""
        if not self._rows_sought:
            self._rows_sought = True
            if self._compiled():
                self._rows = compile_rows(self.plan)
        return self._rows

    def new_works(self) -> np.ndarray:
        """Work vectors for the pool kernels, one per thread: each pool has its own, so pools
        of one model can step in different threads (the kernels release the GIL)."""
        spans = max(1, self.threads)
        return aligned.zeros(spans * work_size(self.plan)).reshape(spans, -1)

    def step_rows(
        self, xs: np.ndarray, table: StateTable, rows: np.ndarray, out: np.ndarray
    ) -> int:
        """One batched kernel call for many (distinct) streams; threads only pay off for large
        batches."""
        if not isinstance(table, StateRows):
            raise TypeError(f"a kernel engine steps its own StateRows, not {type(table)}")
        return self._step_rows(xs, table.array, rows, out, table.works)

    def _step_rows(
        self, xs: np.ndarray, table: np.ndarray, rows: np.ndarray, out: np.ndarray,
        works: np.ndarray,
    ) -> int:  # fmt: skip
        plan = self.plan
        gemm = self._uses_gemm(xs.shape[0])
        own = None if gemm else self._rows_kernels()
        if own is not None and (xs.shape[0] < config.PARALLEL_ROWS or self.threads < 2):
            return int(own[0](plan.params, xs, table, rows, works, out))  # nothing shared
        with _TAKE_TURNS:
            if gemm:
                out[:] = self.gemm.step(xs, table, rows)  # the pool checked xs for NaN already
                return -1
            if own is not None:
                return int(own[1](plan.params, xs, table, rows, works, out))
            return self._interpreted_rows(xs, table, rows, out)

    def _uses_gemm(self, batch: int) -> bool:
        cached = self.plan.params.nbytes <= config.CACHED_BYTES
        least = config.GEMM_BATCH_CACHED if cached else config.GEMM_BATCH
        return batch >= least and self.gemm.supported

    def undoes_overflow(self, batch: int) -> bool:
        """Whether a pool step of `batch` streams keeps the state of a stream whose sample
        overflows (the model's own kernel does; BLAS and the interpreter do not)."""
        return not self._uses_gemm(batch) and self._rows_kernels() is not None

    def pool_note(self) -> str:
        return "one kernel call per pool step"

    def _interpreted_rows(
        self, xs: np.ndarray, table: np.ndarray, rows: np.ndarray, out: np.ndarray
    ) -> int:
        plan, k = self.plan, self.kernels
        if xs.shape[0] >= config.PARALLEL_BATCH and self.threads > 1:
            return int(
                k.step_rows_parallel(
                    plan.code, plan.params, xs, table, rows, self.wide_scratch, out
                )
            )
        return int(k.step_rows(plan.code, plan.params, xs, table, rows, self.scratch[None], out))

    def export(self, state: np.ndarray) -> StateDict:
        saved = {}
        for layer in self.plan.layers:
            saved[f"{layer.node}.h"] = state[layer.h_offset : layer.h_offset + layer.hidden].copy()
            if layer.c_offset >= 0:
                saved[f"{layer.node}.c"] = state[
                    layer.c_offset : layer.c_offset + layer.hidden
                ].copy()
        if self.plan.lag is not None:
            offset, size = self.plan.lag
            saved[LAG_INPUT] = state[offset : offset + size].copy()
        return saved

    def restore(self, saved: StateDict) -> np.ndarray:
        saved = _check_keys(saved, self.shapes)
        state = self.new_state()
        for layer in self.plan.layers:
            state[layer.h_offset : layer.h_offset + layer.hidden] = saved[f"{layer.node}.h"]
            if layer.c_offset >= 0:
                state[layer.c_offset : layer.c_offset + layer.hidden] = saved[f"{layer.node}.c"]
        if self.plan.lag is not None:
            offset, size = self.plan.lag
            state[offset : offset + size] = saved[LAG_INPUT]
        return state


class _StackedPools:
    """The pool side of the slow engines (numpy, onnxruntime): no own kernel; states kept as
    StateColumns; a pool step stacks every stream into one graph call where that was proven
    equal to separate steps (stacked.py), else one call per stream."""

    stacker: Stacker

    def step(self, x: np.ndarray, state: Any, out: np.ndarray) -> int:
        raise NotImplementedError

    def own_kernel(self) -> None:
        return None

    def new_table(self, capacity: int) -> StateColumns:
        return self.stacker.columns(capacity)

    def step_rows(
        self, xs: np.ndarray, table: StateTable, rows: np.ndarray, out: np.ndarray
    ) -> int:
        """A stream whose sample overflows answers NaN and keeps its state. The pool has
        refused NaN input already: -1."""
        if not isinstance(table, StateColumns):
            raise TypeError(f"{type(self).__name__} steps its own StateColumns, not {type(table)}")
        stacker = self.stacker
        if len(rows) >= 2 and stacker.usable() and stacker.step_rows(xs, table, rows, out):
            return -1
        for b, row in enumerate(rows.tolist()):
            state = table.get(row)
            if self.step(xs[b], state, out[b]) == BAD_OUTPUT:
                out[b] = np.nan  # as the kernels answer it; its state is as it was
            else:
                table.put(row, state)
        return -1

    def undoes_overflow(self, batch: int) -> bool:
        return True

    def pool_note(self) -> str:
        if self.stacker.usable():
            return "streams stacked into one call per pool step (proven equal to separate steps)"
        return f"one call per stream: {self.stacker.reason}"


class GraphEngine(_StackedPools):
    """One NumPy pass over the graph per sample; exact for every forward-only graph."""

    def __init__(
        self,
        graph: Graph,
        zero_inputs: dict[str, np.ndarray],
        n_features: int,
        n_outputs: int,
        time_first: bool,
        pairs: list[tuple[str, str]] | None = None,
    ) -> None:
        self.graph = streamable(graph)
        self.zero_inputs = zero_inputs  # batch-1 zeros for every input but x (e.g. h0, c0)
        # graph inputs fed from the graph outputs of the call before (a target transform's
        # lag0 <- lagn): no recurrent node carries them
        self.pairs = pairs or []
        self.n_outputs = n_outputs
        self.x_name, self.y_name = graph.inputs[0], graph.outputs[0]

        def probe(steps: int) -> dict[str, np.ndarray]:
            shape = (steps, 1, n_features) if time_first else (1, steps, n_features)
            return {self.x_name: np.zeros(shape, np.float32), **zero_inputs}

        carrying = stream_time_nodes(self.graph, probe)
        env = self.graph.evaluate(probe(1))
        self.initial = {}  # what each carrying node starts from: a learned constant, or zeros
        for node in self.graph.recurrent_nodes:
            if node.name not in carrying:
                continue
            hidden = env[node.inputs[2]].shape[-1]  # R's; hidden_size is optional in ONNX
            slots = (5, 6) if "LSTM" in node.op else (5,)
            self.initial[node.name] = tuple(
                env[node.inputs[s]]
                if len(node.inputs) > s and node.inputs[s]
                else np.zeros((1, 1, hidden), np.float32)
                for s in slots
            )
        self.shapes = {
            f"{n}.{s}": (v.size,)
            for n, vs in self.initial.items()
            for s, v in zip("hc", vs, strict=False)
        }
        self.shapes |= {i: (zero_inputs[i].size,) for i, _ in self.pairs}
        batch_first = {n.name: 0 for n in self.graph.recurrent_nodes if n.attrs.get("layout") == 1}
        self.stacker = Stacker(self._run_batch, self.step, self.new_state, n_features,
                               n_outputs, time_first, batch_first)  # fmt: skip

    def _run_batch(self, x: np.ndarray, state: dict[str, Any]) -> tuple[np.ndarray, Any]:
        fed = {i: state[i][0] for i, _ in self.pairs}
        nodes = {n: v for n, v in state.items() if n in self.initial}
        env, carried = step_graph(self.graph, {self.x_name: x, **self.zero_inputs, **fed}, nodes)
        carried |= {i: (env[o],) for i, o in self.pairs}
        return env[self.y_name], carried

    def new_state(self) -> dict[str, tuple[np.ndarray, ...]]:
        fresh = {n: tuple(v.copy() for v in vs) for n, vs in self.initial.items()}
        return fresh | {i: (self.zero_inputs[i].copy(),) for i, _ in self.pairs}

    def step(self, x: np.ndarray, state: dict[str, Any], out: np.ndarray) -> int:
        return _one_step(self._run_batch, x, state, out)

    def feed(self, xs: np.ndarray, state: dict[str, Any], out: np.ndarray) -> int:
        return _feed_or_undo(self, xs, state, out)

    def export(self, state: dict[str, Any]) -> StateDict:
        saved = {
            f"{n}.{s}": np.asarray(v, np.float32).reshape(-1).copy()
            for n, vs in state.items()
            if n in self.initial
            for s, v in zip("hc", vs, strict=False)
        }
        return saved | {i: np.asarray(state[i][0], np.float32).reshape(-1).copy()
                        for i, _ in self.pairs}  # fmt: skip

    def restore(self, saved: StateDict) -> dict[str, Any]:
        saved = _check_keys(saved, self.shapes)
        state = {
            n: tuple(
                np.array(saved[f"{n}.{s}"], np.float32).reshape(v.shape)
                for s, v in zip("hc", vs, strict=False)
            )
            for n, vs in self.initial.items()
        }
        return state | {i: (np.array(saved[i], np.float32).reshape(self.zero_inputs[i].shape),)
                        for i, _ in self.pairs}  # fmt: skip


class OrtEngine(_StackedPools):
    """ONNX Runtime, one sample per run() with the state outputs fed back as inputs."""

    def __init__(
        self,
        session: Any,
        pairs: list[tuple[str, str]],
        zero_inputs: dict[str, np.ndarray],
        n_features: int,
        n_outputs: int,
        time_first: bool,
    ) -> None:
        self.session, self.pairs, self.n_outputs = session, pairs, n_outputs
        self.x_name = session.get_inputs()[0].name
        self.y_name = session.get_outputs()[0].name
        self.zero = {i: zero_inputs[i] for i, _ in pairs}
        self.fetch = [self.y_name] + [o for _, o in pairs]
        self.shapes = {i: (v.shape[0] * v.shape[2],) for i, v in self.zero.items()}
        self.stacker = Stacker(self._run_batch, self.step, self.new_state, n_features,
                               n_outputs, time_first)  # fmt: skip

    def _run_batch(self, x: np.ndarray, state: dict[str, np.ndarray]) -> tuple[np.ndarray, Any]:
        y, *new = self.session.run(self.fetch, {self.x_name: x, **state})
        return y, dict(zip((i for i, _ in self.pairs), new, strict=True))

    def new_state(self) -> dict[str, np.ndarray]:
        return {i: v.copy() for i, v in self.zero.items()}

    def step(self, x: np.ndarray, state: dict[str, np.ndarray], out: np.ndarray) -> int:
        return _one_step(self._run_batch, x, state, out)

    def feed(self, xs: np.ndarray, state: dict[str, np.ndarray], out: np.ndarray) -> int:
        return _feed_or_undo(self, xs, state, out)

    def export(self, state: dict[str, np.ndarray]) -> StateDict:
        return {i: v.reshape(-1).copy() for i, v in state.items()}

    def restore(self, saved: StateDict) -> dict[str, np.ndarray]:
        saved = _check_keys(saved, self.shapes)
        return {i: np.array(saved[i], np.float32).reshape(v.shape) for i, v in self.zero.items()}


def _one_step(run: RunBatch, x: np.ndarray, state: dict[str, Any], out: np.ndarray) -> int:
    """A slow engine's step: its batch call on a batch of one, kept only if all is finite."""
    bad = first_bad(x)
    if bad < 0:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow: refused below
            y, after = run(x.reshape(1, 1, -1), state)
        if not _finite([y, *state_arrays(after)]):
            return BAD_OUTPUT  # the state stays as it was
        state.update(after)
        out[:] = y.reshape(-1)
    return bad


def _feed_or_undo(engine: GraphEngine | OrtEngine, xs: np.ndarray, state: dict[str, Any],
                  out: np.ndarray) -> int:  # fmt: skip
    """Step by step; a step that returns BAD_OUTPUT undoes the whole block, as the kernels do."""
    bad = first_bad(xs)
    if bad >= 0:
        return bad
    saved = dict(state)  # steps replace the arrays, never write into them
    for t in range(xs.shape[0]):
        if engine.step(xs[t], state, out[t]) == BAD_OUTPUT:
            state.clear()
            state.update(saved)
            return BAD_OUTPUT
    return -1
