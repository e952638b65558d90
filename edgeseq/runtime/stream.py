"""Stream (one state) and StreamPool (many named states): validate at the edge, then advance.

The verbs are `step`, `feed`, `reset` and `state` (STYLE.md #4). Inputs are checked once per
call (shape, dtype, finite values) and never modified; the hot path below allocates only the
returned array.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgeseq.errors import ShapeError, UsageError
from edgeseq.runtime.engines import Engine, StateDict


def _sample(x: Any, n_features: int, what: str = "sample") -> np.ndarray:
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.shape != (n_features,):
        raise ShapeError(f"{what} has shape {np.shape(x)}; the model expects ({n_features},)")
    return arr


def _block(xs: Any, n_features: int, what: str = "samples") -> np.ndarray:
    arr = np.ascontiguousarray(xs, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != n_features:
        raise ShapeError(f"{what} have shape {np.shape(xs)}; the model expects (T, {n_features})")
    return arr


def _refuse(bad: int, arr: np.ndarray, what: str) -> None:
    """The engines check for NaN and infinity (in the kernel, where it is free)."""
    if bad >= 0:
        where = np.unravel_index(bad, arr.shape)
        index = ", ".join(str(int(i)) for i in where)
        raise ShapeError(
            f"{what}[{index}] is {arr[where]}; expected finite values, state unchanged"
        )


class Stream:
    """One sensor's state: one sample in, one prediction out."""

    def __init__(self, engine: Engine, n_features: int) -> None:
        self._engine, self.n_features = engine, n_features
        self._state = engine.new_state()
        self._shape = (n_features,)
        # The kernel engine's step, bound once: every attribute lookup costs on the hot path.
        self._direct = getattr(engine, "direct_step", None)

    def step(self, x: Any) -> np.ndarray:
        """Feed one sample; return the model's output for it."""
        if (
            type(x) is np.ndarray
            and x.dtype == np.float32
            and x.shape == self._shape
            and x.flags.c_contiguous
        ):
            arr = x  # the kernels copy it in; they never write to it
        else:
            arr = _sample(x, self.n_features)
        out = np.empty(self._engine.n_outputs, np.float32)
        bad = (
            self._direct(arr, self._state, out)
            if self._direct is not None
            else self._engine.step(arr, self._state, out)
        )
        if bad >= 0:
            _refuse(bad, arr, "sample")
        return out

    def feed(self, xs: Any) -> np.ndarray:
        """Feed (T, F) samples in order; (T, n_outputs) outputs, exactly as T calls to step."""
        block = _block(xs, self.n_features)
        out = np.empty((block.shape[0], self._engine.n_outputs), np.float32)
        _refuse(self._engine.feed(block, self._state, out), block, "samples")
        return out

    def reset(self) -> None:
        """Back to the model's initial state."""
        self._state = self._engine.new_state()

    @property
    def state(self) -> StateDict:
        """A copy of the state: {"<layer>.h": (H,), "<layer>.c": (H,)} float32 arrays."""
        return self._engine.export(self._state)

    @state.setter
    def state(self, saved: StateDict) -> None:
        self._state = self._engine.restore(saved)


class StreamPool:
    """Many named streams in one table; `step(ids, X)` advances each named stream once.

    With the Numba engine the states are rows of one (capacity, S) array and a step is one
    batched kernel call; other engines keep one state object per stream.
    """

    def __init__(self, engine: Engine, n_features: int, capacity: int) -> None:
        if capacity < 1:
            raise UsageError(f"pool capacity must be >= 1, found {capacity}")
        self._engine, self.n_features, self.capacity = engine, n_features, capacity
        self.fingerprint = ""  # the model file's sha256, set by Model.pool
        self._table = engine.new_table(capacity) if hasattr(engine, "new_table") else None
        self._rows: dict[str, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._states: list[Any] = [None] * capacity

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, stream_id: object) -> bool:
        return stream_id in self._rows

    @property
    def ids(self) -> list[str]:
        return list(self._rows)

    def _install(self, row: int, state: Any) -> None:
        if self._table is not None:
            self._table[row] = state
            state = self._table[row]  # a view: the kernels update it in place
        self._states[row] = state

    def _row(self, stream_id: str) -> int:
        row = self._rows.get(stream_id)
        if row is None:
            if not self._free:
                raise UsageError(
                    f"the pool is full ({self.capacity} streams); evict one or raise the capacity"
                )
            row = self._rows[stream_id] = self._free.pop()
            self._install(row, self._engine.new_state())
        return row

    def step(self, ids: Sequence[str], xs: Any) -> np.ndarray:
        """One sample for each named stream (new ids start fresh): X (B, F) -> (B, n_outputs)."""
        block = _block(xs, self.n_features, "X")
        if len(ids) != block.shape[0] or len(set(ids)) != len(ids):
            raise ShapeError(
                f"{len(ids)} ids (distinct: {len(set(ids))}) for {block.shape[0]} rows"
            )
        found = list(map(self._rows.get, ids))  # one C-level pass; None marks a new stream
        missing = found.count(None)
        if missing > len(self._free):
            raise UsageError(
                f"{missing} new streams do not fit: the pool holds "
                f"{len(self._rows)} of {self.capacity}"
            )
        if not np.isfinite(block).all():  # before new ids take rows; the kernels re-check
            _refuse(int(np.flatnonzero(~np.isfinite(block))[0]), block, "X")
        rows: list[int] = [self._row(i) for i in ids] if missing else found  # type: ignore[assignment]
        out = np.empty((block.shape[0], self._engine.n_outputs), np.float32)
        if self._table is not None:
            index = np.asarray(rows, np.int64)
            bad = self._engine.step_rows(block, self._table, index, out)  # type: ignore[attr-defined]
            _refuse(bad, block, "X")
        else:
            for b, row in enumerate(rows):
                self._engine.step(block[b], self._states[row], out[b])
        return out

    def reset(self, stream_id: str) -> None:
        self._install(self._row(stream_id), self._engine.new_state())

    def evict(self, stream_id: str) -> None:
        row = self._rows.pop(stream_id, None)
        if row is not None:
            self._states[row] = None
            self._free.append(row)

    def state(self, stream_id: str) -> StateDict:
        if stream_id not in self._rows:
            raise UsageError(f"no stream {stream_id!r} in the pool")
        return self._engine.export(self._states[self._rows[stream_id]])

    def set_state(self, stream_id: str, saved: StateDict) -> None:
        restored = self._engine.restore(saved)
        self._install(self._row(stream_id), restored)
