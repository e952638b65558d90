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
    arr = np.asarray(x, dtype=np.float32)
    if arr.shape != (n_features,):
        raise ShapeError(f"{what} has shape {np.shape(x)}; the model expects ({n_features},)")
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ShapeError(f"{what}[{bad}] is {arr[bad]}; expected finite values")
    return arr if arr is not x else arr.copy()


def _block(xs: Any, n_features: int, what: str = "samples") -> np.ndarray:
    arr = np.ascontiguousarray(xs, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != n_features:
        raise ShapeError(f"{what} have shape {np.shape(xs)}; the model expects (T, {n_features})")
    if not np.isfinite(arr).all():
        t, f = (int(v[0]) for v in np.nonzero(~np.isfinite(arr)))
        raise ShapeError(f"{what}[{t}, {f}] is {arr[t, f]}; expected finite values")
    return arr


class Stream:
    """One sensor's state: one sample in, one prediction out."""

    def __init__(self, engine: Engine, n_features: int) -> None:
        self._engine, self.n_features = engine, n_features
        self._state = engine.new_state()

    def step(self, x: Any) -> np.ndarray:
        """Feed one sample; return the model's output for it."""
        out = np.empty(self._engine.n_outputs, np.float32)
        self._engine.step(_sample(x, self.n_features), self._state, out)
        return out

    def feed(self, xs: Any) -> np.ndarray:
        """Feed (T, F) samples in order; (T, n_outputs) outputs, exactly as T calls to step."""
        block = _block(xs, self.n_features)
        out = np.empty((block.shape[0], self._engine.n_outputs), np.float32)
        self._engine.feed(block, self._state, out)
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
    """Many named streams in one table; `step(ids, X)` advances each named stream once."""

    def __init__(self, engine: Engine, n_features: int, capacity: int) -> None:
        if capacity < 1:
            raise UsageError(f"pool capacity must be >= 1, found {capacity}")
        self._engine, self.n_features, self.capacity = engine, n_features, capacity
        self._states: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, stream_id: str) -> bool:
        return stream_id in self._states

    @property
    def ids(self) -> list[str]:
        return list(self._states)

    def _get(self, stream_id: str) -> Any:
        if stream_id not in self._states:
            if len(self._states) >= self.capacity:
                raise UsageError(
                    f"the pool is full ({self.capacity} streams); evict one or raise the capacity"
                )
            self._states[stream_id] = self._engine.new_state()
        return self._states[stream_id]

    def step(self, ids: Sequence[str], xs: Any) -> np.ndarray:
        """One sample for each named stream (new ids start fresh): X (B, F) -> (B, n_outputs)."""
        block = _block(xs, self.n_features, "X")
        if len(ids) != block.shape[0] or len(set(ids)) != len(ids):
            raise ShapeError(
                f"{len(ids)} ids (distinct: {len(set(ids))}) for {block.shape[0]} rows"
            )
        missing = [i for i in ids if i not in self._states]
        if len(self._states) + len(missing) > self.capacity:
            raise UsageError(
                f"{len(missing)} new streams do not fit: the pool holds "
                f"{len(self._states)} of {self.capacity}"
            )
        out = np.empty((block.shape[0], self._engine.n_outputs), np.float32)
        self._step_many([self._get(i) for i in ids], block, out)
        return out

    def _step_many(self, states: list[Any], block: np.ndarray, out: np.ndarray) -> None:
        for b, state in enumerate(states):
            self._engine.step(block[b], state, out[b])

    def reset(self, stream_id: str) -> None:
        self._states[stream_id] = self._engine.new_state()

    def evict(self, stream_id: str) -> None:
        self._states.pop(stream_id, None)

    def state(self, stream_id: str) -> StateDict:
        if stream_id not in self._states:
            raise UsageError(f"no stream {stream_id!r} in the pool")
        return self._engine.export(self._states[stream_id])

    def set_state(self, stream_id: str, saved: StateDict) -> None:
        restored = self._engine.restore(saved)
        self._get(stream_id)
        self._states[stream_id] = restored
