"""From raw lines to answers, in bulk: parse at the edge, queue (bounded), batch, apply in order.

A transport hands over what arrived together (a chunk read from a socket or stdin, a burst of
MQTT messages) as one `Parcel`: its lines parsed in one loop, and the `Sink` its answers go back
to. The batcher takes every parcel waiting, cuts them into *rounds* (round k holds each
stream's k-th message, so every stream's messages apply strictly in arrival order), steps each
round's streams in batched pool steps, encodes the answers and hands each parcel's answers to
its sink at once: one write per connection per batch, and metrics counted per batch, never
per sample.

Whatever goes wrong with one message becomes an error answer to that message: every message
gets exactly one answer, in its parcel's order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgeseq.daemon.options import DaemonConfig
from edgeseq.daemon.prometheus import Metrics
from edgeseq.daemon.protocol import (
    BadMessage,
    Sample,
    encode,
    encode_many,
    error,
    parse_csv,
    parse_json,
    width_of,
)
from edgeseq.daemon.table import StreamTable
from edgeseq.errors import EdgeseqError

log = logging.getLogger("edgeseq.daemon")
Parser = Callable[[bytes, int, int], Sample]
TOO_LONG = None  # a line splitter's mark for a line over the limit (its bytes were dropped)


class Sink(Protocol):
    def deliver(self, parcel: Parcel, lines: bytes) -> None:
        """Send a parcel's answers: one JSON line per entry, in the parcel's order."""


@dataclass(slots=True)
class Refused:
    """A message refused at the edge; queued like a sample so that its stream's answers keep
    the order of its messages (stream_id None: it names no stream, no order to keep)."""

    stream_id: Any
    answer: dict[str, Any]


Entry = Sample | Refused


@dataclass(slots=True)
class Parcel:
    """Messages that arrived together from one sink, parsed, in arrival order."""

    sink: Sink
    entries: list[Entry]
    arrived: float = field(default_factory=time.perf_counter)
    context: Any = None  # the transport's own per-message data (MQTT: topic ids, mids)


def refusal(bad: BadMessage) -> Refused:
    return Refused(bad.stream_id, error(bad.code, bad.message, bad.stream_id, bad.seq))


class Batcher:
    """The one queue between every transport and the stream table."""

    def __init__(self, config: DaemonConfig, table: StreamTable, metrics: Metrics) -> None:
        self.config, self.table, self.metrics = config, table, metrics
        self._parcels: deque[Parcel] = deque()
        self.queued = 0  # messages in waiting parcels: past queue_size, transports stop reading
        self._wake = asyncio.Event()
        self._room_waiters: list[Callable[[], None]] = []
        self._parse = parse_csv if config.format == "csv" else parse_json
        self.after_batch: list[Callable[[], None]] = []  # e.g. flush stdout once per batch

    # -- the edge --------------------------------------------------------------------------------

    @property
    def width(self) -> int:
        """The served model's feature count, with their names (protocol.Width)."""
        model = self.table.model
        return width_of(model.n_features, model.feature_names)

    def parse(self, line: bytes, parse: Parser | None = None) -> Sample:
        return (parse or self._parse)(line, self.width, self.config.max_line_bytes)

    def parse_lines(self, lines: Iterable[bytes | None]) -> list[Entry]:
        """Every line as a Sample or a Refused; TOO_LONG marks a line cut off at the limit."""
        parse, width, limit = self._parse, self.width, self.config.max_line_bytes
        entries: list[Entry] = []
        for line in lines:
            if line is TOO_LONG:
                bad = BadMessage("too_long", f"the line is longer than {limit} bytes; ignored")
                entries.append(refusal(bad))
                continue
            try:
                entries.append(parse(line, width, limit))
            except BadMessage as bad:
                entries.append(refusal(bad))
        return entries

    @property
    def full(self) -> bool:
        return self.queued >= self.config.queue_size

    def put(self, parcel: Parcel) -> None:
        """Queue a parcel whatever the queue holds (a chunk already read must be answered);
        transports that can wait stop reading while `full` (TCP flow control does the rest)."""
        if parcel.entries:
            self._parcels.append(parcel)
            self.queued += len(parcel.entries)
            self._wake.set()

    def when_room(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the queue is below its limit again (a paused reader resumes)."""
        if not self.full:
            callback()
        else:
            self._room_waiters.append(callback)

    async def room(self) -> None:
        """Wait until the queue is below its limit."""
        if self.full:
            ready = asyncio.get_running_loop().create_future()

            def wake() -> None:
                if not ready.done():
                    ready.set_result(None)

            self.when_room(wake)
            await ready

    # -- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Forever: wait for parcels, take what has arrived together, apply it."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._parcels:
                batch = self._take()
                try:
                    n = sum(len(p.entries) for p in batch)
                    if self.config.max_wait > 0 and 1 < n < self.config.max_batch:
                        await asyncio.sleep(self.config.max_wait)  # concurrent traffic: gather
                        batch += self._take(self.config.max_batch - n)
                finally:  # also when cancelled on the way out: what was taken is answered
                    self.process(batch)
                await asyncio.sleep(0)  # let readers and writers run between batches

    def _take(self, wanted: int | None = None) -> list[Parcel]:
        """Whole parcels, until `wanted` (max_batch) messages are taken."""
        wanted = self.config.max_batch if wanted is None else wanted
        batch: list[Parcel] = []
        taken = 0
        while self._parcels and taken < wanted:
            parcel = self._parcels.popleft()
            batch.append(parcel)
            taken += len(parcel.entries)
        self.queued -= taken
        if self._room_waiters and not self.full:
            waiters, self._room_waiters = self._room_waiters, []
            for resume in waiters:
                resume()
        return batch

    def drain_all(self) -> None:
        """Apply everything still queued (on the way out)."""
        while self._parcels:
            self.process(self._take())

    def process(self, batch: Sequence[Parcel]) -> None:
        """Answer every message of `batch`; each parcel's answers go to its sink at once."""
        answers: list[list[Any]] = [[None] * len(p.entries) for p in batch]
        for round_ in _rounds(batch):
            applied = iter(self._apply([e for _, _, e in round_ if type(e) is Sample]))
            for b, k, entry in round_:
                answers[b][k] = entry.answer if isinstance(entry, Refused) else next(applied)
        done = time.perf_counter()
        outcomes: Counter[str] = Counter()
        for parcel, given in zip(batch, answers, strict=True):
            _count(given, outcomes)
            _safe(parcel, _encoded(given))
        for flush in self.after_batch:
            flush()
        self.metrics.latency.observe_many([done - p.arrived for p in batch],
                                          [len(p.entries) for p in batch])  # fmt: skip
        for outcome, n in outcomes.items():  # once per batch, not per sample
            if outcome in ("applied", "duplicate"):
                self.metrics.samples.labels(outcome).inc(n)
            else:
                self.metrics.errors.labels(outcome).inc(n)

    def _apply(self, samples: list[Sample]) -> list[dict[str, Any]]:
        """One round's samples through the table, in pool steps of at most max_batch."""
        size = self.config.max_batch
        answers: list[dict[str, Any]] = []
        for start in range(0, len(samples), size):
            answers += self._apply_step(samples[start : start + size])
        return answers

    def _apply_step(self, samples: list[Sample]) -> list[dict[str, Any]]:
        try:
            return self.table.apply(samples)
        except EdgeseqError as exc:  # not expected: every sample was checked at the edge
            log.error("batch refused; stepping its samples one by one", extra={"detail": str(exc)})
            return [self._apply_alone(sample) for sample in samples]
        except Exception as exc:  # a defect, perhaps after the pool stepped: a retry could
            detail = f"{type(exc).__name__}: {exc}"  # apply samples twice; answer, serve on
            log.error("batch failed", extra={"detail": detail})
            return [error("internal", detail, s.stream_id, s.seq) for s in samples]

    def _apply_alone(self, sample: Sample) -> dict[str, Any]:
        """One sample on its own, so that one bad sample cannot spoil a whole round."""
        try:
            return self.table.apply([sample])[0]
        except Exception as exc:  # answered, logged, and the daemon serves on
            log.error("sample refused", extra={"detail": f"{type(exc).__name__}: {exc}"})
            return error("internal", str(exc), sample.stream_id, sample.seq)


def _count(answers: list[dict[str, Any]], outcomes: Counter[str]) -> None:
    """Each answer's outcome: "applied", "duplicate", or the error code."""
    for answer in answers:
        if "error" in answer:
            outcomes[str(answer["error"]["code"])] += 1
        elif "duplicate" in answer:
            outcomes["duplicate"] += 1
        else:
            outcomes["applied"] += 1


def _encoded(answers: list[dict[str, Any]]) -> bytes:
    """A parcel's answer lines; a defect while encoding still leaves one line per message."""
    try:
        return encode_many(answers)
    except Exception:  # one answer at a time: only the one that fails is replaced
        return b"".join(map(_encoded_one, answers))


def _encoded_one(answer: dict[str, Any]) -> bytes:
    try:
        return encode(answer)
    except Exception as exc:
        detail = f"the answer could not be encoded: {type(exc).__name__}"
        return encode(error("internal", detail, None, None))


def _rounds(batch: Sequence[Parcel]) -> list[list[tuple[int, int, Entry]]]:
    """Round k holds the k-th message of each stream in the batch, in arrival order, as
    (parcel index, entry index, entry). Messages that name no stream go in round 0."""
    rounds: list[list[tuple[int, int, Entry]]] = [[]]
    depth: dict[Any, int] = {}
    first = rounds[0]
    for b, parcel in enumerate(batch):
        for k, entry in enumerate(parcel.entries):
            sid = entry.stream_id
            if sid is None:
                first.append((b, k, entry))
                continue
            d = depth.get(sid, 0)
            depth[sid] = d + 1
            if d == 0:
                first.append((b, k, entry))
            else:
                if d == len(rounds):
                    rounds.append([])
                rounds[d].append((b, k, entry))
    return rounds


def _safe(parcel: Parcel, lines: bytes) -> None:
    """A client that went away, or answers that cannot be written, must not take the daemon
    (or other parcels' answers) with them."""
    try:
        parcel.sink.deliver(parcel, lines)
    except (OSError, RuntimeError) as exc:
        log.debug("answers not delivered", extra={"detail": str(exc)})
    except Exception as exc:  # a defect, not a client's doing: say so, and keep serving
        log.error("answers not delivered", extra={"detail": f"{type(exc).__name__}: {exc}"})
