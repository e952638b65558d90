"""From raw lines to answers: parse at the edge, queue (bounded), batch, apply in order.

Transports call `submit(line, reply)`; `reply(answer_dict)` sends one answer back on the
connection (or topic, or stdout) the sample came from. Samples that arrive together, for
different streams, go through one batched pool step; a batch holding several samples of one
stream is cut into *rounds* (round k holds each stream's k-th sample), so every stream's samples
are applied strictly in the order they arrived.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgeseq.daemon.config import DaemonConfig
from edgeseq.daemon.metrics import Metrics
from edgeseq.daemon.protocol import BadMessage, Sample, error, parse_csv, parse_json
from edgeseq.daemon.table import StreamTable
from edgeseq.errors import EdgeseqError

log = logging.getLogger("edgeseq.daemon")
Reply = Callable[[dict[str, Any]], None]
Parser = Callable[[bytes, int, int], Sample]


@dataclass(slots=True)
class Pending:
    sample: Sample | None
    reply: Reply
    arrived: float  # perf_counter() at parse time
    refused: dict[str, Any] | None = None  # the error answer of a message refused at the edge
    stream_id: Any = None  # the stream it belongs to (for ordering), also when refused


class Batcher:
    """The one queue between every transport and the stream table."""

    def __init__(self, config: DaemonConfig, table: StreamTable, metrics: Metrics) -> None:
        self.config, self.table, self.metrics = config, table, metrics
        self.queue: asyncio.Queue[Pending] = asyncio.Queue(config.queue_size)
        self._parse = parse_csv if config.format == "csv" else parse_json
        self.after_batch: list[Callable[[], None]] = []  # e.g. flush stdout once per batch

    def parse(self, line: bytes, parse: Parser | None = None) -> Sample:
        return (parse or self._parse)(line, self.table.model.n_features, self.config.max_line_bytes)

    def reject(self, bad: BadMessage, reply: Reply) -> None:
        """Answer a refused message at once: it never reaches a stream."""
        self.metrics.errors.labels(bad.code).inc()
        log.debug("message refused", extra={"code": bad.code, "detail": bad.message})
        _safe(reply, error(bad.code, bad.message, bad.stream_id, bad.seq))

    def _refused(self, bad: BadMessage, reply: Reply) -> Pending | None:
        """A refused message of a known stream is queued like a sample, so that a stream's
        answers keep the order of its messages; one of no known stream is answered at once."""
        if bad.stream_id is None:
            self.reject(bad, reply)
            return None
        refused = error(bad.code, bad.message, bad.stream_id, bad.seq)
        return Pending(None, reply, time.perf_counter(), refused, bad.stream_id)

    async def submit(self, line: bytes, reply: Reply, parse: Parser | None = None) -> None:
        """Parse one line and queue it; waits while the queue is full (backpressure)."""
        try:
            sample = self.parse(line, parse)
        except BadMessage as bad:
            pending = self._refused(bad, reply)
            if pending is not None:
                await self.queue.put(pending)
            return
        await self.queue.put(Pending(sample, reply, time.perf_counter(), None, sample.stream_id))

    def offer_refused(self, bad: BadMessage, reply: Reply) -> None:
        """`offer` for a message refused at the edge."""
        pending = self._refused(bad, reply)
        if pending is not None:
            try:
                self.queue.put_nowait(pending)
            except asyncio.QueueFull:
                self.reject(bad, reply)

    def offer(self, sample: Sample, reply: Reply) -> None:
        """Queue without waiting (for transports that cannot be slowed down, like MQTT's
        callback thread): a full queue drops the sample, counted, with an `overloaded` answer."""
        try:
            pending = Pending(sample, reply, time.perf_counter(), None, sample.stream_id)
            self.queue.put_nowait(pending)
        except asyncio.QueueFull:
            self.reject(
                BadMessage(
                    "overloaded",
                    f"the daemon's queue is full ({self.config.queue_size} samples); "
                    "this sample was dropped, not applied (with seq, a resend is applied "
                    "only if no later seq of its stream was)",
                    sample.stream_id,
                    sample.seq,
                ),
                reply,
            )

    async def run(self) -> None:
        """Forever: wait for samples, take what has arrived together, apply it."""
        while True:
            batch = [await self.queue.get()]
            try:
                self._drain(batch)
                await asyncio.sleep(0)  # let readers with buffered lines add theirs
                self._drain(batch)
                if self.config.max_wait > 0 and 1 < len(batch) < self.config.max_batch:
                    await asyncio.sleep(self.config.max_wait)  # concurrent traffic: gather more
                    self._drain(batch)
            finally:  # also when cancelled on the way out: what was taken is answered
                self.process(batch)

    def _drain(self, batch: list[Pending]) -> None:
        while len(batch) < self.config.max_batch:
            try:
                batch.append(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                return

    def drain_all(self) -> None:
        """Apply everything still queued (on the way out)."""
        batch: list[Pending] = []
        while not self.queue.empty():
            self._drain(batch)
            self.process(batch)
            batch = []

    def process(self, batch: list[Pending]) -> None:
        outcomes: Counter[str] = Counter()
        observe = self.metrics.latency.observe
        for round_ in _rounds(batch):
            answers = self._apply(round_)
            done = time.perf_counter()
            for pending, answer in zip(round_, answers, strict=True):
                outcomes[_outcome(answer)] += 1
                observe(done - pending.arrived)
                _safe(pending.reply, answer)
        for flush in self.after_batch:
            flush()
        for outcome, n in outcomes.items():  # once per batch, not per sample
            if outcome in ("applied", "duplicate"):
                self.metrics.samples.labels(outcome).inc(n)
            else:
                self.metrics.errors.labels(outcome).inc(n)

    def _apply(self, round_: list[Pending]) -> list[dict[str, Any]]:
        samples = [p.sample for p in round_ if p.sample is not None]
        try:
            applied = iter(self.table.apply(samples))
        except EdgeseqError as exc:  # not expected: every sample was checked at the edge
            log.error("batch refused; stepping its samples one by one", extra={"detail": str(exc)})
            applied = iter([self._apply_alone(sample) for sample in samples])
        except Exception as exc:  # a defect, perhaps after the pool stepped: a retry could
            detail = f"{type(exc).__name__}: {exc}"  # apply samples twice; answer, serve on
            log.error("batch failed", extra={"detail": detail})
            applied = iter([error("internal", detail, s.stream_id, s.seq) for s in samples])
        return [p.refused if p.refused is not None else next(applied) for p in round_]

    def _apply_alone(self, sample: Sample) -> dict[str, Any]:
        """One sample on its own, so that one bad sample cannot spoil a whole round."""
        try:
            return self.table.apply([sample])[0]
        except Exception as exc:  # answered, logged, and the daemon serves on
            log.error("sample refused", extra={"detail": f"{type(exc).__name__}: {exc}"})
            return error("internal", str(exc), sample.stream_id, sample.seq)


def _outcome(answer: dict[str, Any]) -> str:
    """ "applied", "duplicate", or the error code."""
    if "error" in answer:
        return str(answer["error"]["code"])
    return "duplicate" if answer.get("duplicate") else "applied"


def _rounds(batch: list[Pending]) -> list[list[Pending]]:
    """Round k holds the k-th sample of each stream in the batch, in arrival order."""
    rounds: list[list[Pending]] = []
    depth: dict[str, int] = {}
    for pending in batch:
        k = depth.get(pending.stream_id, 0)
        depth[pending.stream_id] = k + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(pending)
    return rounds


def _safe(reply: Reply, answer: dict[str, Any]) -> None:
    """A client that went away, or an answer that cannot be written, must not take the daemon
    (or other streams' answers) with it."""
    try:
        reply(answer)
    except (OSError, RuntimeError) as exc:
        log.debug("answer not delivered", extra={"detail": str(exc)})
    except Exception as exc:  # a defect, not a client's doing: say so, and keep serving
        log.error("answer not delivered", extra={"detail": f"{type(exc).__name__}: {exc}"})
