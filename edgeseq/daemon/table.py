"""The daemon's stream table: a StreamPool plus, per stream, what makes redelivery harmless.

For every stream it remembers the last applied `seq` and the answer given to it, and when the
stream was last heard from. `apply` takes one *round* (at most one sample per stream) and
advances all of its streams in one batched pool step; duplicates are answered from memory,
stale samples refused, and nothing is ever applied twice. Capacity and idle expiry live here
too, so eviction is always counted and logged by the one place that does it.

A stream the table does not know may start only at its beginning: seq 0, a message without
seq, or an explicit `reset`/`start`. Any other seq is answered `resend` from 0: after a crash,
a stream whose first samples came after the last checkpoint is unknown again, and applying its
seq 9 to a zero state would be silently wrong. With checkpoints on, every answer carries
`durable`, the stream's last seq inside a completed checkpoint: what a client may forget.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeseq.daemon.protocol import Sample, _brief, answer, error
from edgeseq.errors import CheckpointError, EdgeseqError, UsageError
from edgeseq.runtime import Model, StreamPool
from edgeseq.runtime.state_files import Snapshot, pool_snapshot, restore_pool

log = logging.getLogger("edgeseq.daemon")
EXTREME_INPUT = 1e15  # |x| from which a sample may overflow float32 inside a model
EXTRA_KEYS = ("seq", "y")  # the bookkeeping `snapshot` writes beside the states


@dataclass(slots=True)
class StreamInfo:
    seq: int | None = None  # last applied seq
    y: list[float] | None = None  # the answer given to it
    seen: float = field(default_factory=time.monotonic)
    # Restored from a checkpoint, which may be older than the last answer given before a crash:
    # until seq+1 arrives, a newer seq would skip samples the state never saw, so it is refused
    # with the seq to resend from (a `reset` or a message without seq also clears this).
    resync: bool = False
    durable: int | None = None  # its seq in the last completed checkpoint (Checkpointer sets it)


@dataclass
class Counters:
    """What the table did; metrics read these (the table never imports prometheus)."""

    applied: int = 0
    duplicates: int = 0
    gaps: int = 0
    evictions: dict[str, int] = field(default_factory=lambda: {"idle": 0, "end": 0})


class StreamTable:
    """States and seq bookkeeping of every live stream, in one pool of `capacity` rows."""

    def __init__(self, model: Model, capacity: int) -> None:
        self.model, self.capacity = model, capacity
        try:
            self.pool: StreamPool = model.pool(capacity)
        except MemoryError:
            floats = sum(np.size(v) for v in model.stream().state.values())
            raise UsageError(
                f"max_streams is {capacity}: a table of {capacity} states of {floats} floats "
                f"({capacity * floats * 4 / 2**30:.1f} GiB) does not fit in memory; lower "
                "max_streams"
            ) from None
        self.info: dict[str, StreamInfo] = {}
        self.counters = Counters()
        self.durable = False  # answers carry "durable" (the daemon checkpoints)
        self.on_step: Callable[[int, float], None] = lambda batch, seconds: None
        self.on_event: Callable[[str, str], None] = lambda event, label: None  # gap, eviction

    def __len__(self) -> int:
        return len(self.info)

    def apply(self, round_: list[Sample]) -> list[dict[str, Any]]:
        """Answers for one round of samples, each for a different stream, in the same order."""
        answers: list[dict[str, Any] | None] = [None] * len(round_)
        step_at: list[int] = []
        now = time.monotonic()
        known, width = self.info.get, self.model.n_features
        for k, sample in enumerate(round_):
            info = known(sample.stream_id)
            if (  # the usual sample: the next seq of a live stream, nothing else asked
                info is not None
                and sample.seq is not None
                and info.seq is not None
                and sample.seq == info.seq + 1
                and not (info.resync or sample.reset or sample.end or sample.start)
                and sample.x is not None
                and len(sample.x) == width
            ):
                info.seen = now
                step_at.append(k)
                continue
            refused = self._admit(sample, now)
            if refused is not None:
                answers[k] = refused
            elif sample.x is not None:
                step_at.append(k)
        if step_at:
            self._step(round_, step_at, answers)
        for k, sample in enumerate(round_):
            if answers[k] is None:  # a bare reset or end
                answers[k] = {"id": sample.stream_id, "seq": sample.seq, "ok": True}
            if sample.end and "error" not in answers[k] and "duplicate" not in answers[k]:  # type: ignore[operator]
                self._drop(sample.stream_id, "end")
        return answers  # type: ignore[return-value]

    def _step(self, round_: list[Sample], step_at: list[int], answers: list[Any]) -> None:
        """One batched pool step for the samples at `step_at`; their answers filled in."""
        ids = [round_[k].stream_id for k in step_at]
        xs = np.array([round_[k].x for k in step_at], np.float32)
        saved = self._save_if_extreme(ids, xs)
        start = time.perf_counter()
        out = self.pool.step(ids, xs)
        self.on_step(len(ids), time.perf_counter() - start)
        finite = np.isfinite(out).all(axis=1)
        durable, info_of = self.durable, self.info
        applied = 0
        for k, y, ok in zip(step_at, out.tolist(), finite.tolist(), strict=True):
            sample = round_[k]
            info = info_of[sample.stream_id]
            if ok and (not saved or not self._poisoned(sample.stream_id, saved)):
                info.seq, info.y = sample.seq, y
                done = {"id": sample.stream_id, "seq": sample.seq, "y": y}
                if durable:
                    done["durable"] = info.durable
                answers[k] = done
                applied += 1
                continue
            kept = self._roll_back(sample.stream_id, saved) or self.pool.undoes_overflow(len(ids))
            if not kept:  # applied after all: a resend must not apply it twice
                info.seq, info.y = sample.seq, None
            answers[k] = error(
                "bad_output",
                "the model's output or state for this sample is not finite (an input far "
                "outside the training range?); "
                + ("the state is unchanged" if kept else "the state was advanced"),
                sample.stream_id,
                sample.seq,
            )
        self.counters.applied += applied

    def _save_if_extreme(self, ids: list[str], xs: np.ndarray) -> dict[str, Any]:
        """States of the streams whose samples could overflow float32 inside the model (scaled
        inputs near 1e38 turn into inf and NaN): kept so a poisoned state can be undone.
        Ordinary samples cost one max() for the whole round."""
        if not xs.size or float(np.abs(xs).max()) < EXTREME_INPUT:
            return {}
        risky = np.abs(xs).max(axis=1) >= EXTREME_INPUT
        return {sid: self.pool.state(sid) if sid in self.pool else None
                for sid, bad in zip(ids, risky.tolist(), strict=True) if bad}  # fmt: skip

    def _poisoned(self, sid: str, saved: dict[str, Any]) -> bool:
        if sid not in saved:
            return False
        return not all(np.isfinite(v).all() for v in self.pool.state(sid).values())

    def _roll_back(self, sid: str, saved: dict[str, Any]) -> bool:
        if sid not in saved:
            return False
        if saved[sid] is None:
            self.pool.reset(sid)  # a stream that this sample started: back to the start
        else:
            self.pool.set_state(sid, saved[sid])
        return True

    def _admit(self, sample: Sample, now: float) -> dict[str, Any] | None:
        """Seq, capacity and reset checks for one sample; an answer if it must not be applied."""
        sid, info = sample.stream_id, self.info.get(sample.stream_id)
        if sample.start and info is not None:  # a new sequence: the old one's seq are no guide
            info = self.info[sid] = StreamInfo(seen=now)
            self.pool.reset(sid)
        if sample.x is not None and len(sample.x) != self.model.n_features:  # after a reload
            return error(
                "wrong_features",
                f'"x" has {len(sample.x)} values; the model expects {self.model.n_features}',
                sid,
                sample.seq,
            )
        if info is not None and sample.seq is not None and info.seq is not None:
            if sample.seq == info.seq:
                self.counters.duplicates += 1
                info.seen = now
                extra = {"durable": info.durable} if self.durable else {}
                if info.y is None:
                    return {"id": sid, "seq": sample.seq, "ok": True, "duplicate": True, **extra}
                return answer(sid, sample.seq, info.y, duplicate=True, **extra)
            if sample.seq < info.seq:
                return error(
                    "stale",
                    f"seq {sample.seq} is older than the last applied seq {info.seq}; not applied",
                    sid,
                    sample.seq,
                )
            if sample.seq > info.seq + 1:
                if info.resync and not sample.reset:
                    refused = error(
                        "resend",
                        f"the daemon restarted from a checkpoint at seq {info.seq} of this "
                        f"stream; resend from seq {info.seq + 1} (or send reset)",
                        sid,
                        sample.seq,
                    )
                    refused["error"]["resend_from"] = info.seq + 1
                    return refused
                self.counters.gaps += 1
                self.on_event("gap", "")
        if info is None and sample.x is None and not (sample.reset or sample.start):
            return {"id": sid, "seq": sample.seq, "ok": True}  # ending a stream never started
        if info is None and sample.seq and not (sample.reset or sample.start):
            refused = error(
                "resend",
                f"stream {sid!r} is not known here (new, or it began after the last checkpoint "
                f'before a restart); send it from seq 0, or begin it with "start": true',
                sid,
                sample.seq,
            )
            refused["error"]["resend_from"] = 0
            return refused
        if info is None:
            if len(self.info) >= self.capacity:
                return error(
                    "capacity",
                    f"the stream table is full ({self.capacity} streams); stream {sid!r} was "
                    "not started (end idle streams, or raise --max-streams)",
                    sid,
                    sample.seq,
                )
            info = self.info[sid] = StreamInfo(seen=now)
        info.seen, info.resync = now, False
        if sample.reset or sample.start:
            self.pool.reset(sid)
        if sample.x is None:
            if sid not in self.pool:
                self.pool.reset(sid)  # a bare reset starts the stream
            info.seq, info.y = sample.seq, None
        return None

    def _drop(self, sid: str, reason: str) -> None:
        if self.info.pop(sid, None) is None:
            return
        self.pool.evict(sid)
        self.counters.evictions[reason] = self.counters.evictions.get(reason, 0) + 1
        self.on_event("eviction", reason)

    def expire(self, idle_timeout: float, now: float | None = None) -> list[str]:
        """Evict every stream not heard from for `idle_timeout` seconds; their ids."""
        now = time.monotonic() if now is None else now
        idle = [sid for sid, info in self.info.items() if now - info.seen >= idle_timeout]
        for sid in idle:
            self._drop(sid, "idle")
            log.info("stream evicted", extra={"stream": sid, "reason": "idle"})
        return idle

    # -- persistence and reload ---------------------------------------------------------------

    def snapshot(self, ids: Iterable[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(states, extra) for save_snapshot: states of every stream (or of those of `ids` the
        table holds: one partition's) and their seq bookkeeping. An answer of another output
        width (given before a reload) is not written: `restore` would refuse it. Once the
        snapshot is on disk, `made_durable(extra)` tells each stream (this incarnation of it:
        not one ended and begun again since) what it holds."""
        if ids is None:
            states, infos = pool_snapshot(self.pool), self.info
        else:
            infos = {sid: self.info[sid] for sid in ids if sid in self.info}
            states = {sid: self.pool.state(sid) for sid in infos if sid in self.pool}
        width = self.model.n_outputs
        ys = {sid: info.y for sid, info in infos.items()}
        extra = {
            "seq": {sid: info.seq for sid, info in infos.items()},
            "y": {sid: y if y and len(y) == width else None for sid, y in ys.items()},
        }
        return states, extra

    def forget(self, ids: Iterable[str]) -> int:
        """Drop these streams without counting an eviction: they moved to another daemon (a
        partition handed over). How many were held."""
        dropped = 0
        for sid in ids:
            if self.info.pop(sid, None) is not None:
                dropped += 1
            if sid in self.pool:
                self.pool.evict(sid)
        return dropped

    def made_durable(self, extra: dict[str, Any], infos: dict[str, StreamInfo]) -> None:
        """A snapshot taken when the table's streams were `infos` (a copy of `self.info` at
        that instant) is on disk: each of those streams' seq in it is now durable."""
        for sid, seq in extra["seq"].items():
            info = infos.get(sid)
            if info is not None and seq is not None:
                info.durable = seq

    def restore(self, snap: Snapshot) -> None:
        """Put a snapshot's streams back, with their seq numbers and last answers. Malformed
        bookkeeping is refused (CheckpointError) before anything is restored."""
        seqs, ys = _bookkeeping(snap.extra, self.model.n_outputs)
        restore_pool(self.pool, snap)
        now = time.monotonic()
        for sid in snap.ids:
            seq = seqs.get(sid)
            self.info[sid] = StreamInfo(seq, ys.get(sid), now, seq is not None, seq)

    def swap_model(self, model: Model) -> bool:
        """Move every stream onto `model`'s pool; True if states carried over, False if the new
        model's state shapes differ and every stream was reset (seq bookkeeping is kept).
        States whose keys were renamed (another exporter, an int8 rebuild) but whose shapes
        match layer for layer carry over in order."""
        pool = model.pool(self.capacity)
        rename = _state_renaming(self.model.stream().state, model.stream().state)
        kept = rename is not None
        for sid in self.pool.ids if kept else []:
            old = self.pool.state(sid)
            try:
                pool.set_state(sid, {rename[key]: value for key, value in old.items()})  # type: ignore[index]
            except EdgeseqError:
                kept = False
                break
        if not kept:
            pool = model.pool(self.capacity)
            for sid in self.info:
                pool.reset(sid)
        self.model, self.pool = model, pool
        return kept


def _state_renaming(old: dict[str, Any], new: dict[str, Any]) -> dict[str, str] | None:
    """old key -> new key when the two models' states have the same shapes in the same order
    (the same names map to themselves); None when they differ."""
    if set(old) == set(new):
        same = all(np.shape(old[k]) == np.shape(new[k]) for k in old)
        return {k: k for k in old} if same else None
    shapes_old = [np.shape(v) for v in old.values()]
    shapes_new = [np.shape(v) for v in new.values()]
    return dict(zip(old, new, strict=True)) if shapes_old == shapes_new else None


def _bookkeeping(extra: Any, width: int) -> tuple[dict[str, int | None], dict[str, Any]]:
    """A snapshot's `extra` as (seq by stream id, y by stream id), every entry checked: a seq is
    an integer >= 0 or null, a y null or `width` finite floats. None (a plain pool's snapshot)
    is no bookkeeping at all."""
    if extra is None:
        return {}, {}
    unknown = sorted(set(extra) - set(EXTRA_KEYS))
    if unknown:
        raise CheckpointError(f"header extra has unknown keys {unknown}; expected only 'seq', 'y'")
    seqs = _entries(extra, "seq", _is_seq, "an integer >= 0 or null")
    expected = f"null or a list of {width} finite floats (the model's output width)"
    ys = _entries(extra, "y", lambda y: _is_answer(y, width), expected)
    return seqs, {sid: None if y is None else [float(v) for v in y] for sid, y in ys.items()}


def _entries(extra: dict[str, Any], key: str, ok: Callable[[Any], bool], expected: str) -> Any:
    table = extra.get(key, {})
    if not isinstance(table, dict):
        raise CheckpointError(
            f"header extra {key!r} is {_brief(table)}; expected a JSON object of stream id -> "
            f"{expected}"
        )
    for sid, value in table.items():
        if not ok(value):
            raise CheckpointError(
                f"header extra {key!r} of stream {sid!r} is {_brief(value)}; expected {expected}"
            )
    return table


def _is_seq(value: object) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


def _is_answer(y: object, width: int) -> bool:
    """None, or what a duplicate can be answered with: `width` finite numbers."""
    return y is None or (isinstance(y, list) and len(y) == width and all(map(_is_finite, y)))


def _is_finite(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond float range
        return False
