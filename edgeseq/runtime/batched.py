"""Pools on the slow engines (onnxruntime, numpy): every stream's sample in one call.

Stepping 1,024 streams one run() at a time costs 1,024 times the ~60 us of ONNX Runtime's call
overhead (or the NumPy evaluator's): about 9,000 samples a second. Stacked along the batch axis,
the same streams take one call. The graph's batch axis is not declared anywhere we can trust, so
it is found and proven once per engine, before first use: outputs for 2 and 3 streams tell the
axis of y that grows with the batch, and a batch of 3 streams in random states must answer what
3 separate steps answer (within STACK_TOLERANCE) and leave the same states. A graph that fails
any of this (a batch-1 input it cannot broadcast, a reshape that mixes streams) keeps stepping
one stream at a time, as before: slower, never different.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

STACK_TOLERANCE = 1e-5  # max abs gap between a stacked step and separate steps (float32 sums)
BATCH_AXIS = 1  # of a state array by default: (directions * layers, batch, hidden), as in ONNX;
# a node with layout=1 keeps its state as (batch, directions, hidden): its key maps to axis 0
Axes = Mapping[str, int]  # state key -> the batch axis of its arrays, where not BATCH_AXIS

# (x (1, B, F) or (B, 1, F), stacked state) -> (y, new stacked state); the engine's own call
RunBatch = Callable[[np.ndarray, Any], tuple[np.ndarray, Any]]
# (x (F,), state, out (n_out,)) -> -1 or BAD_OUTPUT; the engine's one-stream step
StepOne = Callable[[np.ndarray, Any, np.ndarray], int]


def _leaves(state: dict[str, Any], axes: Axes) -> list[tuple[np.ndarray, int]]:
    """Every array of a state with its batch axis: values are arrays (onnxruntime) or tuples
    of them (numpy)."""
    out: list[tuple[np.ndarray, int]] = []
    for key, value in state.items():
        axis = axes.get(key, BATCH_AXIS)
        out.extend((a, axis) for a in (value if isinstance(value, tuple) else (value,)))
    return out


def stack(states: list[dict[str, Any]], axes: Axes) -> dict[str, Any]:
    """Streams' states joined along the batch axis, same keys and nesting."""
    joined: dict[str, Any] = {}
    for key, value in states[0].items():
        axis = axes.get(key, BATCH_AXIS)
        if isinstance(value, tuple):
            joined[key] = tuple(
                np.concatenate([s[key][i] for s in states], axis=axis) for i in range(len(value))
            )
        else:
            joined[key] = np.concatenate([s[key] for s in states], axis=axis)
    return joined


def _split(a: np.ndarray, axis: int) -> list[np.ndarray]:
    """(L, B, H) -> B arrays of shape (L, 1, H) (axis 1), each its own copy: a view would keep
    the whole batch's array alive for as long as any one of its streams sits idle."""
    return [v.copy() for v in np.expand_dims(np.moveaxis(a, axis, 0), axis + 1)]


def unstack(joined: dict[str, Any], axes: Axes) -> list[list[tuple[str, Any]]]:
    """The inverse of stack: each stream's (key, value) pairs, which a dict.update installs."""
    per_key: list[list[Any]] = []
    for key, value in joined.items():
        axis = axes.get(key, BATCH_AXIS)
        if isinstance(value, tuple):
            per_key.append(list(zip(*(_split(a, axis) for a in value), strict=True)))
        else:
            per_key.append(_split(value, axis))
    keys = list(joined)
    return [list(zip(keys, values, strict=True)) for values in zip(*per_key, strict=True)]


def finite_streams(y_rows: np.ndarray, joined: dict[str, Any], axes: Axes) -> np.ndarray:
    """(B,) bool: the streams whose output and every state value are finite."""
    ok = np.isfinite(y_rows).all(axis=1)
    for leaf, axis in _leaves(joined, axes):
        ok &= np.isfinite(leaf).all(axis=tuple(a for a in range(leaf.ndim) if a != axis))
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

    def _x(self, block: np.ndarray) -> np.ndarray:
        return block[None] if self.time_first else block[:, None]

    def _rows(self, y: np.ndarray, batch: int) -> np.ndarray:
        assert self._y_axis is not None
        return np.moveaxis(y, self._y_axis, 0).reshape(batch, -1)

    def usable(self) -> bool:
        """Whether stacked steps are proven equal to separate ones (proves it the first time)."""
        with self._proving:
            return self._usable()

    def _usable(self) -> bool:
        if not self.proven and self.reason is None:
            try:
                self.reason = self._prove()
            except Exception as exc:  # ONNX Runtime raises its own classes; any failure refuses
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                self.reason = f"a stacked step failed ({type(exc).__name__}: {first})"
            self.proven = self.reason is None
        return self.proven

    def _prove(self) -> str | None:
        rng = np.random.default_rng(0)
        shapes = {}
        for batch in (2, 3):
            xs = rng.standard_normal((batch, self.n_features)).astype(np.float32)
            fresh = [self._new_state() for _ in range(batch)]
            y, _ = self._run(self._x(xs), stack(fresh, self.axes))
            shapes[batch] = y.shape
        grown = [a for a, (s2, s3) in enumerate(zip(shapes[2], shapes[3], strict=False))
                 if (s2, s3) == (2, 3)]  # fmt: skip
        if len(shapes[2]) != len(shapes[3]) or len(grown) != 1:
            return f"no single batch axis in the output (shapes {shapes[2]} and {shapes[3]})"
        self._y_axis = grown[0]
        batch = 3
        states = [self._random_state(rng) for _ in range(batch)]
        xs = rng.standard_normal((batch, self.n_features)).astype(np.float32)
        y, joined = self._run(self._x(xs), stack(states, self.axes))
        y_rows = self._rows(y, batch)
        if y_rows.shape[1] != self.n_outputs:
            return f"a stacked output has {y_rows.shape[1]} values per stream, not {self.n_outputs}"
        gap = 0.0
        for b, (state, pairs) in enumerate(zip(states, unstack(joined, self.axes), strict=True)):
            after = dict(pairs)
            alone, out = {k: v for k, v in state.items()}, np.empty(self.n_outputs, np.float32)
            if self._step_one(xs[b], alone, out) != -1:
                return "a probe step overflowed"
            gap = max(gap, float(np.abs(out - y_rows[b]).max()))
            for (a, _), (s, _) in zip(_leaves(alone, {}), _leaves(after, {}), strict=True):
                gap = max(gap, float(np.abs(a.reshape(-1) - s.reshape(-1)).max()))
        if not gap <= STACK_TOLERANCE:
            return f"stacked steps differ from separate ones by {gap:.3g}"
        return None

    def _random_state(self, rng: np.random.Generator) -> dict[str, Any]:
        def noise(a: np.ndarray) -> np.ndarray:
            return (0.5 * rng.standard_normal(a.shape)).astype(np.float32)

        return {k: tuple(noise(a) for a in v) if isinstance(v, tuple) else noise(v)
                for k, v in self._new_state().items()}  # fmt: skip

    def step_many(self, block: np.ndarray, states: list[dict[str, Any]], out: np.ndarray) -> bool:
        """One sample per stream: out (B, n_out); each state dict updated in place. A stream
        whose output or state would be NaN or infinite answers NaN and keeps its state.

        False (nothing changed) when the stacked call fails at run time: stacking is then
        given up for good and the caller steps the streams one at a time, whose errors are
        the engine's own."""
        batch = block.shape[0]
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # overflow: answered NaN below
                y, joined = self._run(self._x(block), stack(states, self.axes))
            y_rows = self._rows(y, batch)
        except Exception as exc:  # ONNX Runtime raises its own classes
            self.proven, self.reason = False, f"a stacked step of {batch} failed ({exc!r:.200})"
            return False
        ok = finite_streams(y_rows, joined, self.axes)
        out[:] = y_rows
        out[~ok] = np.nan
        for state, pairs, keep in zip(states, unstack(joined, self.axes), ok.tolist(), strict=True):
            if keep:
                state.update(pairs)
        return True
