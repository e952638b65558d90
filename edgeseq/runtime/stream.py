"""Stream (one state) and StreamPool (many named states): validate at the edge, then advance.

The verbs are `step`, `feed`, `reset` and `state`. Inputs are checked once per
call (shape, dtype, finite values) and never modified; the hot path below allocates only the
returned array.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgeseq.errors import ShapeError, UsageError
from edgeseq.features import by_name
from edgeseq.runtime.engines import Engine, StateDict, as_real
from edgeseq.runtime.kernels.codes import BAD_OUTPUT, SHAPE_MISMATCH, Kernel

_F32 = np.dtype(np.float32)  # a dtype object, not the type: np.empty resolves it 2x faster
_F64 = np.dtype(np.float64)
_I64 = np.dtype(np.int64)
_empty = np.empty
_NDARRAY = np.ndarray
# Element types of a list or tuple that np.asarray reads as a float64 (or narrower float, or
# bool) vector, and those it reads as an int64 vector (mixed with np.uint64 it promotes ints to
# float64, hence not np.uint64): see _Staging.listed.
_FLOATS = frozenset({float, bool, np.float64, np.float32, np.float16, np.bool_})
_INTS = frozenset({int, bool, np.int64, np.int32, np.int16, np.int8, np.uint32,
                   np.uint16, np.uint8})  # fmt: skip
_EXACT_INT = 2**53  # ints up to this size are exact doubles
MAX_CAPACITY = 1 << 22  # streams in one pool (4 Mi: a table of a few GiB for a large model)


def _real(x: Any, what: str) -> np.ndarray:
    try:
        return as_real(x)
    except ShapeError as exc:
        raise ShapeError(f"{what}: {exc}") from None


def _sample(x: Any, n_features: int, what: str = "sample") -> np.ndarray:
    """x as a fresh float32 vector of the model's width: the slow path's copy, so read-only,
    strided or foreign-order arrays and lists reach the kernels as plain float32 vectors."""
    arr = np.array(_real(x, what), dtype=np.float32, order="C")
    if arr.shape != (n_features,):
        raise ShapeError(f"{what} has shape {np.shape(x)}; the model expects ({n_features},)")
    return arr


class _Staging:
    """One stream's own float32 vector, and the casts of samples in other layouts into it.

    Each cast is the one as_real makes (np.asarray(x).astype(float32)), to the bit, without
    allocating and without NumPy's overflow warning, which a cast to float32 emits unless it
    runs inside np.errstate (~1 us): beyond float32 a value becomes infinity, as there, and
    the kernel refuses it. Stream.step casts the common layouts (lists and tuples of floats or
    of small ints, float64 and int64 vectors) itself, with this object's vectors and packers;
    cast() takes the rest, and leaves what is not a real vector of the model's width to the
    general conversion, which reads or refuses it."""

    def __init__(self, n_features: int) -> None:
        self.x = np.zeros(n_features, np.float32)
        self.shape, self.n = self.x.shape, n_features
        self.int32 = np.zeros(n_features, np.int32)  # only to check ints (Stream.step)
        # C casts of Python numbers straight into the vectors (native format: no overflow
        # check, so a float beyond float32 packs as infinity, as NumPy's cast makes it), into
        # memoryviews, whose buffers are quicker to get than an ndarray's.
        # Any: numpy's stubs do not declare that an ndarray is a buffer.
        self.x_buffer = memoryview(self.x)  # type: ignore[arg-type]
        self.int32_buffer = memoryview(self.int32)  # type: ignore[arg-type]
        self.pack_floats: Any = struct.Struct(f"@{n_features}f").pack_into
        self.pack_int32: Any = struct.Struct(f"@{n_features}i").pack_into

    def cast(self, x: Any) -> np.ndarray:
        """x, in a layout Stream.step does not cast itself, as a float32 vector: cast into
        self.x where it can be, else a new vector from the general conversion, which reads
        what np.asarray reads (a list of Decimals: object values) or refuses it."""
        cls = x.__class__
        if cls is list or cls is tuple:
            staged = self.wide(x)
        elif cls is _NDARRAY and x.shape == self.shape:
            staged = self.array(x)
        else:
            staged = None
        return _sample(x, self.n) if staged is None else staged

    def array(self, x: np.ndarray) -> np.ndarray | None:
        """A vector of the model's width: NumPy's cast where it cannot overflow (float32 in
        another byte order or not aligned, float16, ints, bools), float64 through Python
        floats."""
        kind, size = x.dtype.kind, x.dtype.itemsize
        if kind == "f" and size == 8:
            self.pack_floats(self.x_buffer, 0, *x.tolist())
        elif kind in "biu" or (kind == "f" and size <= 4):
            self.x[...] = x
        else:
            return None  # longdouble (no exact Python float), complex, strings, objects...
        return self.x

    def wide(self, x: list[Any] | tuple[Any, ...]) -> np.ndarray | None:
        """A list or tuple of ints, some beyond 31 bits, cast into self.x, when they are exact
        doubles (at most 2**53): packing them as floats then rounds once, as int64 -> float32
        does. Anything else (mixed with floats, wider, of another width) is np.asarray's to
        read (None)."""
        if (
            len(x) == self.n
            and _INTS.issuperset(map(type, x))
            and min(x) >= -_EXACT_INT
            and max(x) <= _EXACT_INT
        ):
            self.pack_floats(self.x_buffer, 0, *x)
            return self.x
        return None


def _named(sample: Mapping[str, Any], names: tuple[str, ...]) -> list[Any]:
    """A sample given by feature name, as its values in the model's order (features.by_name)."""
    if not names:
        raise ShapeError("sample is given by name, but this model has no feature names (no "
                         "edgeseq metadata); give its values in order")  # fmt: skip
    return by_name(sample, names)


def _block(xs: Any, n_features: int, what: str = "samples") -> np.ndarray:
    arr = xs if isinstance(xs, np.ndarray) and xs.dtype == _F32 else _real(xs, what)
    arr = np.ascontiguousarray(arr)
    if arr.ndim != 2 or arr.shape[1] != n_features:
        raise ShapeError(f"{what} have shape {np.shape(xs)}; the model expects (T, {n_features})")
    return arr


def _refuse(bad: int, arr: np.ndarray, what: str) -> None:
    """The engines check for NaN and infinity (in the kernel, where it is free)."""
    if bad == BAD_OUTPUT:
        raise ShapeError(
            f"{what} drove the model's state or output to NaN or infinity (values far outside "
            "what it was trained on?); state unchanged"
        )
    if bad >= 0:
        where = np.unravel_index(bad, arr.shape)
        index = ", ".join(str(int(i)) for i in where)
        raise ShapeError(
            f"{what}[{index}] is {arr[where]}; expected finite values, state unchanged"
        )


class Stream:
    """One sensor's state: one sample in, one prediction out.

    With the Numba engine the stream runs its model's own compiled kernel (specialize.py) on
    one `work` vector holding its state and its scratch; `step` hands the caller's array to
    the kernel as is when it is a plain float32 vector, and casts any other layout (a strided
    row of a frame, float64, ints, a list...) into the stream's own vector first (_Staging).
    """

    def __init__(self, engine: Engine, n_features: int, names: tuple[str, ...] = ()) -> None:
        self._engine, self.n_features = engine, n_features
        self.feature_names = names  # a sample may map them to values (features.by_name)
        self._n_out = engine.n_outputs
        own = engine.own_kernel()
        if own is not None:
            self._kernel: Kernel | None = own.kernel
            self._params, self._work = own.params, own.work
            self._state = self._work[: own.state_size]  # a view: the kernel's state
        else:
            self._kernel = None
            self._state = engine.new_state()
        self._staging = _Staging(n_features)  # samples in other layouts are cast into it

    def step(self, x: Any) -> np.ndarray:
        """Feed one sample; return the model's output for it."""
        out = _empty(self._n_out, _F32)
        if self._kernel is None:
            arr = _sample(x, self.n_features)
            _refuse(self._engine.step(arr, self._state, out), arr, "sample")
            return out
        # A float32 array goes to the kernel as is: its signature takes any float32 vector
        # (strided, read-only, unaligned), and the dispatcher's C type check refuses the rest
        # (a matrix, a 0-d array) with a TypeError. The common other layouts are cast into the
        # stream's own vector right here (a Python call costs as much as a cast), the rare
        # ones by _Staging.cast; letting the dispatcher refuse a float64 array or a list
        # would build an error message (~100 us).
        if x.__class__ is not _NDARRAY or x.dtype is not _F32:
            cls, staging = x.__class__, self._staging
            if cls is dict:  # by name: the values in the model's order, then as a list
                x, cls = _named(x, self.feature_names), list
            if cls is list or cls is tuple:
                try:
                    if x[0].__class__ in _INTS:  # ints of at most 31 bits: int32's pack checks
                        staging.pack_int32(staging.int32_buffer, 0, *x)
                        staging.x[...] = staging.int32  # rounds once, as int64 -> float32 does
                    elif _FLOATS.issuperset(map(type, x)):  # not a Decimal, a string...
                        staging.pack_floats(staging.x_buffer, 0, *x)
                    else:
                        raise struct.error
                    x = staging.x
                except (struct.error, IndexError):  # mixed, wider ints, another width...
                    x = staging.cast(x)
            elif cls is _NDARRAY and x.shape == staging.shape and x.dtype is _F64:
                staging.pack_floats(staging.x_buffer, 0, *x.tolist())  # C casts: beyond float32,
                x = staging.x  # infinity (NumPy's cast would warn)
            elif cls is _NDARRAY and x.shape == staging.shape and x.dtype is _I64:
                staging.x[...] = x  # int64 never overflows float32
                x = staging.x
            else:
                x = staging.cast(x)
        try:
            bad = self._kernel(self._params, x, self._work, out)
        except TypeError:  # a float32 array that is not a vector: refused, naming its shape
            x = _sample(x, self.n_features)
            bad = self._kernel(self._params, x, self._work, out)
        if bad != -1:
            if bad == SHAPE_MISMATCH:
                _sample(x, self.n_features)  # raises, naming the shape found
            _refuse(bad, x, "sample")
        return out

    def feed(self, xs: Any) -> np.ndarray:
        """Feed (T, F) samples in order; (T, n_outputs) outputs, exactly as T calls to step."""
        block = _block(xs, self.n_features)
        out = np.empty((block.shape[0], self._n_out), np.float32)
        if self._kernel is not None:
            bad = self._kernel(self._params, block.reshape(-1), self._work, out.reshape(-1))
        else:
            bad = self._engine.feed(block, self._state, out)
        _refuse(bad, block, "samples")
        return out

    def _load(self, state: Any) -> None:
        if self._kernel is not None:
            self._state[:] = state
        else:
            self._state = state

    def reset(self) -> None:
        """Back to the model's initial state."""
        self._load(self._engine.new_state())

    @property
    def state(self) -> StateDict:
        """A copy of the state: {"<layer>.h": (H,), "<layer>.c": (H,)} float32 arrays."""
        return self._engine.export(self._state)

    @state.setter
    def state(self, saved: StateDict) -> None:
        self._load(self._engine.restore(saved))


class StreamPool:
    """Many named streams in one table; `step(ids, X)` advances each named stream once.

    With the Numba engine the states are rows of one (capacity, S) array and a step is one
    batched kernel call; the onnxruntime and numpy engines keep each state array of every
    stream in one array (StateColumns) and step them all in one stacked call where that is
    proven equal to separate steps (stacked.py), else one at a time.
    """

    def __init__(self, engine: Engine, n_features: int, capacity: int) -> None:
        if (
            not isinstance(capacity, int | np.integer)
            or isinstance(capacity, bool)
            or not (1 <= capacity <= MAX_CAPACITY)
        ):
            raise UsageError(f"pool capacity must be an integer in 1..{MAX_CAPACITY}, "
                             f"found {capacity!r}")  # fmt: skip
        capacity = int(capacity)
        self._engine, self.n_features, self.capacity = engine, n_features, capacity
        self.fingerprint = ""  # the model file's sha256, set by Model.pool
        self._table = engine.new_table(capacity)  # every stream's state, in the engine's layout
        self._rows: dict[str, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._last: tuple[tuple[str, ...], np.ndarray] | None = None  # step()'s last ids, rows

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, stream_id: object) -> bool:
        return stream_id in self._rows

    @property
    def ids(self) -> list[str]:
        return list(self._rows)

    def _install(self, row: int, state: Any) -> None:
        self._table.put(row, state)

    def _state_of(self, row: int) -> Any:
        """One stream's state in its engine's form (for export, which copies it)."""
        return self._table.get(row)

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
        """One sample for each named stream (new ids start fresh): X (B, F) -> (B, n_outputs).

        A stream whose sample drives its state or output to NaN or infinity answers NaN (the
        daemon refuses that answer and restores the stream). Its state is kept as it was where
        undoes_overflow(len(ids)) says so; in batches large enough for BLAS undoing would cost a
        copy of every stream's state per step: reset it or set its state there."""
        block = _block(xs, self.n_features, "X")
        if not np.isfinite(block).all():  # before new ids take rows; the kernels re-check
            _refuse(int(np.flatnonzero(~np.isfinite(block))[0]), block, "X")
        if ids is None or isinstance(ids, str | bytes) or not hasattr(ids, "__iter__"):
            raise ShapeError(f"ids must be a sequence of stream ids (strings), found {ids!r:.60}")
        key = tuple(ids)
        if self._last is not None and self._last[0] == key and len(key) == block.shape[0]:
            index = self._last[1]  # the same streams as the last step: their rows still hold
        else:
            index = self._rows_of(key, block.shape[0])
            self._last = (key, index)
        out = np.empty((block.shape[0], self._engine.n_outputs), np.float32)
        _refuse(self._engine.step_rows(block, self._table, index, out), block, "X")
        return out

    def undoes_overflow(self, batch: int) -> bool:
        """Whether step() with `batch` streams keeps the state of a stream whose sample
        overflows the model (it always answers NaN for it)."""
        return self._engine.undoes_overflow(batch)

    def _rows_of(self, ids: tuple[str, ...], n_samples: int) -> np.ndarray:
        """The table rows of `ids`, taking free rows for new ones; checked before any is taken.

        A pool is usually stepped with the same ids call after call (a daemon's batch, a
        fleet of sensors), so step() keeps the last answer: for 1,024 streams this work (a
        set, a dict lookup per id, an index array) is a tenth of the whole GEMM step."""
        try:
            found = list(map(self._rows.get, ids))  # one C-level pass; None marks a new stream
            distinct = len(set(ids))
        except TypeError:  # an unhashable id, such as a list
            distinct = -1
        odd = next((i for i in ids if not isinstance(i, str)), None) if distinct < 0 else None
        missing = found.count(None) if distinct >= 0 else 0
        if missing:  # ids already in the pool are strings; only new ones need the check
            odd = next((i for i, f in zip(ids, found, strict=True)
                        if f is None and not isinstance(i, str)), None)  # fmt: skip
        if distinct < 0 or odd is not None:
            raise ShapeError(f"stream ids must be strings, found {odd!r:.60}")
        if len(ids) != n_samples or distinct != len(ids):
            raise ShapeError(f"{len(ids)} ids (distinct: {distinct}) for {n_samples} rows")
        if missing > len(self._free):
            raise UsageError(
                f"{missing} new streams do not fit: the pool holds "
                f"{len(self._rows)} of {self.capacity}"
            )
        rows = [self._row(i) for i in ids] if missing else found
        return np.asarray(rows, np.int64)

    def reset(self, stream_id: str) -> None:
        self._install(self._row(_id(stream_id)), self._engine.new_state())

    def evict(self, stream_id: str) -> None:
        row = self._rows.pop(_id(stream_id), None)
        if row is not None:
            self._last = None  # the row may go to another id
            self._free.append(row)

    def state(self, stream_id: str) -> StateDict:
        if _id(stream_id) not in self._rows:
            raise UsageError(f"no stream {stream_id!r} in the pool")
        return self._engine.export(self._state_of(self._rows[stream_id]))

    def set_state(self, stream_id: str, saved: StateDict) -> None:
        restored = self._engine.restore(saved)
        self._install(self._row(_id(stream_id)), restored)


def _id(stream_id: Any) -> str:
    if not isinstance(stream_id, str):
        raise UsageError(f"a stream id is a string, found {stream_id!r:.60}")
    return stream_id
