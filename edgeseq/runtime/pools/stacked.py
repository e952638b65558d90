"""Pools on the slow engines (onnxruntime, numpy): every stream's sample in one call.

Stepping 1,024 streams one run() at a time costs 1,024 times the ~60 us of ONNX Runtime's call
overhead (or the NumPy evaluator's): about 9,000 samples a second. Stacked along the batch axis,
the same streams take one call. The graph's batch axis is not declared anywhere we can trust, so
it is found and proven once per engine, before first use: outputs for 2 and 3 streams tell the
axis of y that grows with the batch, and a batch of 3 streams in random states must answer what
3 separate steps answer (within STACK_TOLERANCE) and leave the same states. A graph that fails
any of this (a batch-1 input it cannot broadcast, a reshape that mixes streams, int8 weights
whose activations are quantised per call) keeps stepping one stream at a time: slower, never
different.

A pool on these engines keeps its states in StateColumns: each state array of every stream as
the rows of one table, so a step gathers its streams' rows with one indexing per array and
writes the new ones back with one assignment, whatever the number of streams.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

STACK_TOLERANCE = 1e-5  # gap |a - b| / (1 + |b|) allowed between stacked and separate steps
BATCH_AXIS = 1  # of a state array by default: (directions * layers, batch, hidden), as in ONNX;
# a node with layout=1 keeps its state as (batch, directions, hidden): its key maps to axis 0
Axes = Mapping[str, int]  # state key -> the batch axis of its arrays, where not BATCH_AXIS

# (x (1, B, F) or (B, 1, F), stacked state) -> (y, new stacked state); the engine's own call
RunBatch = Callable[[np.ndarray, Any], tuple[np.ndarray, Any]]
# (x (F,), state, out (n_out,)) -> -1 or BAD_OUTPUT; the engine's one-stream step
StepOne = Callable[[np.ndarray, Any, np.ndarray], int]


def state_arrays(state: dict[str, Any]) -> list[np.ndarray]:
    """Every array of a state in a fixed order: values are arrays (onnxruntime) or tuples of
    them (numpy, one per recurrent node: h, or h and c)."""
    out: list[np.ndarray] = []
    for value in state.values():
        out.extend(value if isinstance(value, tuple) else (value,))
    return out


def _gap(got: np.ndarray, expected: np.ndarray) -> float:
    """Largest gap relative to the value (absolute below 1), as verify.py measures a plan's;
    NaN counts as no match. Batched products sum in another order: a few float32 ulps."""
    gap = np.abs(got - expected) / (1.0 + np.abs(expected))
    return float(np.nan_to_num(gap, nan=np.inf).max())


class StateColumns:
    """Many streams' states of one engine: for each array of a state, one (capacity, size)
    table with a stream's values in each row.

    Rows are stored flat, so keeping a state needs nothing of its shape; only stacking
    (gather, scatter) reads the batch axis, where each stream's array has size 1."""

    def __init__(self, template: dict[str, Any], capacity: int, axes: Axes) -> None:
        self._layout = [(k, len(v) if isinstance(v, tuple) else None) for k, v in template.items()]
        self._axes = [axes.get(k, BATCH_AXIS) for k, n in self._layout for _ in range(n or 1)]
        self._shapes = [np.shape(v) for v in state_arrays(template)]
        self.columns = [np.zeros((capacity, int(np.prod(s))), np.float32) for s in self._shapes]
        self._buffers: dict[int, np.ndarray] = {}

    def _state(self, values: list[np.ndarray]) -> dict[str, Any]:
        state: dict[str, Any] = {}
        it = iter(values)
        for key, count in self._layout:
            state[key] = next(it) if count is None else tuple(next(it) for _ in range(count))
        return state

    def put(self, row: int, state: dict[str, Any]) -> None:
        """Store one stream's state in `row`."""
        for column, value in zip(self.columns, state_arrays(state), strict=True):
            column[row] = np.reshape(value, -1)

    def get(self, row: int) -> dict[str, Any]:
        """One stream's state, as the engine's step takes it (fresh arrays)."""
        pairs = zip(self.columns, self._shapes, strict=True)
        return self._state([column[row].reshape(shape).copy() for column, shape in pairs])

    def _scratch(self, slot: int, size: int) -> np.ndarray:
        """A reused flat buffer of at least `size` floats: a fresh half-megabyte array per call
        costs a page fault per 4 KiB, more than the copy itself (as in gemm.BatchRunner)."""
        buf = self._buffers.get(slot)
        if buf is None or buf.size < size:
            buf = self._buffers[slot] = np.empty(size, np.float32)
        return buf[:size]

    def gather(self, rows: np.ndarray) -> dict[str, Any]:
        """The states of `rows`, stacked in that order along each array's batch axis (in
        buffers reused by the next gather: the caller is done with them by then)."""
        stacked, batch = [], len(rows)
        for i, (column, shape, axis) in enumerate(
            zip(self.columns, self._shapes, self._axes, strict=True)
        ):
            if shape[axis] != 1:
                raise ValueError(f"a state array of shape {shape} has no batch axis {axis}")
            rest = shape[:axis] + shape[axis + 1 :]
            by_row = self._scratch(2 * i, column.shape[1] * batch).reshape(batch, -1)
            np.take(column, rows, axis=0, out=by_row, mode="clip")  # rows are the pool's own:
            # "clip" writes straight into out, where "raise" fills a temporary of its size
            out_shape = (*rest[:axis], batch, *rest[axis:])
            joined = self._scratch(2 * i + 1, by_row.size).reshape(out_shape)
            np.copyto(joined, np.moveaxis(by_row.reshape(batch, *rest), 0, axis))
            stacked.append(joined)
        return self._state(stacked)

    def scatter(self, rows: np.ndarray, joined: dict[str, Any], keep: np.ndarray) -> None:
        """Write back the stacked states of `rows` where `keep` (B,) is true."""
        every = bool(keep.all())
        for column, shape, value, axis in zip(
            self.columns, self._shapes, state_arrays(joined), self._axes, strict=True
        ):
            rest = shape[:axis] + shape[axis + 1 :]
            by_row = np.moveaxis(value, axis, 0)  # a view: assigned without a temporary
            target = column.reshape(column.shape[0], *rest)
            if every:
                target[rows] = by_row
            else:
                target[rows[keep]] = by_row[keep]

    def finite(self, joined: dict[str, Any], batch: int) -> np.ndarray:
        """(B,) bool: the stacked streams whose every state value is finite."""
        ok = np.ones(batch, bool)
        for value, axis in zip(state_arrays(joined), self._axes, strict=True):
            if not np.isfinite(value.sum()):  # finite unless some value is inf or NaN (or the
                # sum overflows): then find the streams, without a temporary in the usual case
                ok &= np.isfinite(value).all(axis=tuple(a for a in range(value.ndim) if a != axis))
        return ok


class Stacker:
    """Steps many streams of one engine in one call, once that is proven to equal stepping them
    one by one (see the module docstring); `reason` says why not when it is not."""

    def __init__(self, run_batch: RunBatch, step_one: StepOne, new_state: Callable[[], Any],
                 n_features: int, n_outputs: int, time_first: bool,
                 axes: Axes | None = None) -> None:  # fmt: skip
        self._run, self._step_one, self._new_state = run_batch, step_one, new_state
        self.axes: Axes = axes or {}
        self.n_features, self.n_outputs, self.time_first = n_features, n_outputs, time_first
        self._y_axis: int | None = None
        self.reason: str | None = None  # None until proven (or refused)
        self.proven = False
        self._proving = threading.Lock()

    def columns(self, capacity: int) -> StateColumns:
        """Room for `capacity` streams' states (a pool's)."""
        return StateColumns(self._new_state(), capacity, self.axes)

    def _x(self, block: np.ndarray) -> np.ndarray:
        return block[None] if self.time_first else block[:, None]

    def _rows(self, y: np.ndarray, batch: int) -> np.ndarray:
        assert self._y_axis is not None
        return np.moveaxis(y, self._y_axis, 0).reshape(batch, -1)

    def usable(self) -> bool:
        """Whether stacked steps are proven equal to separate ones (proves it the first time)."""
        with self._proving:
            if not self.proven and self.reason is None:
                try:
                    self.reason = self._prove()
                except Exception as exc:  # ONNX Runtime raises its own classes: all refuse
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    self.reason = f"a stacked step failed ({type(exc).__name__}: {first})"
                self.proven = self.reason is None
            return self.proven

    def _filled(self, states: list[dict[str, Any]]) -> StateColumns:
        columns = self.columns(len(states))
        for row, state in enumerate(states):
            columns.put(row, state)
        return columns

    def _prove(self) -> str | None:
        rng = np.random.default_rng(0)
        shapes = {}
        for batch in (2, 3):
            xs = rng.standard_normal((batch, self.n_features)).astype(np.float32)
            fresh = self._filled([self._new_state() for _ in range(batch)])
            y, _ = self._run(self._x(xs), fresh.gather(np.arange(batch)))
            shapes[batch] = y.shape
        grown = [a for a, (s2, s3) in enumerate(zip(shapes[2], shapes[3], strict=False))
                 if (s2, s3) == (2, 3)]  # fmt: skip
        if len(shapes[2]) != len(shapes[3]) or len(grown) != 1:
            return f"no single batch axis in the output (shapes {shapes[2]} and {shapes[3]})"
        self._y_axis = grown[0]
        batch, rows = 3, np.array([2, 0, 1])  # out of order, as a pool's rows come
        states = [self._random_state(rng) for _ in range(batch)]
        columns = self._filled(states)
        xs = rng.standard_normal((batch, self.n_features)).astype(np.float32)
        y, joined = self._run(self._x(xs), columns.gather(rows))
        y_rows = self._rows(y, batch)
        if y_rows.shape[1] != self.n_outputs:
            return f"a stacked output has {y_rows.shape[1]} values per stream, not {self.n_outputs}"
        columns.scatter(rows, joined, np.ones(batch, bool))
        gap = 0.0
        for b, row in enumerate(rows.tolist()):
            alone, out = dict(states[row]), np.empty(self.n_outputs, np.float32)
            if self._step_one(xs[b], alone, out) != -1:
                return "a probe step overflowed"
            gap = max(gap, _gap(y_rows[b], out))
            for a, s in zip(state_arrays(alone), state_arrays(columns.get(row)), strict=True):
                gap = max(gap, _gap(s.reshape(-1), a.reshape(-1)))
        if not gap <= STACK_TOLERANCE:
            return f"stacked steps differ from separate ones by {gap:.3g}"
        return None

    def _random_state(self, rng: np.random.Generator) -> dict[str, Any]:
        def noise(a: np.ndarray) -> np.ndarray:
            return (0.5 * rng.standard_normal(a.shape)).astype(np.float32)

        return {k: tuple(noise(a) for a in v) if isinstance(v, tuple) else noise(v)
                for k, v in self._new_state().items()}  # fmt: skip

    def step_rows(self, block: np.ndarray, columns: StateColumns, rows: np.ndarray,
                  out: np.ndarray) -> bool:  # fmt: skip
        """One sample per stream rows[b]: out (B, n_out), their states in `columns` updated. A
        stream whose output or state would be NaN or infinite answers NaN and keeps its state.

        False (nothing changed) when the stacked call fails at run time: stacking is then
        given up for good and the caller steps the streams one at a time, whose errors are
        the engine's own."""
        batch = block.shape[0]
        try:
            # overflow (and the finite check's sums) may warn: such streams answer NaN below
            with np.errstate(over="ignore", invalid="ignore"):
                y, joined = self._run(self._x(block), columns.gather(rows))
                y_rows = self._rows(y, batch)
                keep = np.isfinite(y_rows).all(axis=1) & columns.finite(joined, batch)
            if y_rows.shape != out.shape:
                raise ValueError(f"outputs of shape {y_rows.shape} for {out.shape}")
        except Exception as exc:  # ONNX Runtime raises its own classes
            self.proven, self.reason = False, f"a stacked step of {batch} failed ({exc!r:.200})"
            return False
        columns.scatter(rows, joined, keep)
        out[:] = y_rows
        out[~keep] = np.nan
        return True
