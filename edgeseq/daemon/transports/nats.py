"""NATS JetStream: samples on `edgeseq.in.<id>`, partitioned over every daemon of the cluster,
answers on `edgeseq.out.<id>`; each partition's states checkpointed in JetStream and moved with
the partition when its daemon dies (docs/cluster.md).

Per partition this daemon owns (partitioned/leases.py) it runs an ordered consumer of the
samples' stream, from the sequence after the partition's checkpoint. The messages of one read
become one parcel for the batcher, as MQTT's do; each answer records the stream sequence of its
sample, so a checkpoint says exactly which samples its states include. Taking a partition over
is: read its checkpoint, restore its streams, replay from the sequence after it. The samples
applied after that checkpoint on the daemon that died are applied again from the same states:
every (id, seq) is applied once to the states that survive, and an answer published again is
the same answer. A checkpoint is written only after the answers it covers have reached the
server (flush), so no answer can be lost behind a checkpoint; after a lost connection, the
partitions are taken again from their checkpoints so that answers lost in flight come again.

Everything here runs on the daemon's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.errors import Error as NatsError
from nats.js.api import ConsumerConfig, DeliverPolicy

from edgeseq.daemon.batcher import Batcher, Entry, Parcel, refusal
from edgeseq.daemon.options import nats_servers
from edgeseq.daemon.partitioned.checkpoints import PartitionCheckpoints, Superseded
from edgeseq.daemon.partitioned.layout import Layout, ensure
from edgeseq.daemon.partitioned.leases import Leases
from edgeseq.daemon.protocol import BadMessage, addressed_message, encode, read_message
from edgeseq.errors import CheckpointError, EdgeseqError

log = logging.getLogger("edgeseq.daemon")
RETRY = 0.5  # seconds between attempts to reach the cluster
NATS_FAILURES = (NatsError, asyncio.TimeoutError, TimeoutError, OSError)
PENDING_MESSAGES = 65_536  # per partition's subscription: past this, JetStream flow control


ACK_WAIT = 10.0  # seconds an answer stored in the answers' stream may wait for its ack


class AnswersLost(NatsError):
    """Answers that may not have reached the cluster: no checkpoint may cover them."""


def daemon_name() -> str:
    """HOST-PID, as a KV key token allows."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


def stream_sequence(reply: str) -> int:
    """The stream sequence in a JetStream delivery's reply subject: $JS.ACK.<stream>.<consumer>.
    <delivered>.<sseq>... (9 tokens), or with domain and account hash in front (12 and more).
    A fifth of the cost of the client's full metadata parse, for the one field we need."""
    tokens = reply.split(".", 9)
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


@dataclass(eq=False)
class Partition:
    """One partition this daemon owns: a new object each time it is taken."""

    number: int
    applied: int = 0  # stream sequence of the last sample answered
    written: int = 0  # the sequence the last checkpoint covers
    inflight: int = 0  # samples handed to the batcher, not yet answered
    ids: set[str] = field(default_factory=set)
    sub: Any = None
    epoch: int = 0  # answer failures counted when it was taken: a checkpoint needs none since
    closed: bool = False  # being let go: messages still coming are left to the next owner
    drained: asyncio.Event = field(default_factory=asyncio.Event)


class NatsTransport:
    def __init__(
        self, batcher: Batcher, status: dict[str, Any], fatal: Callable[[BaseException], None]
    ) -> None:
        config = batcher.config
        self.batcher, self.config, self.status, self.fatal = batcher, config, status, fatal
        self.layout = Layout.of(config)
        self.servers = nats_servers(config.nats or "")
        self.name = config.nats_name or daemon_name()
        self.table = batcher.table
        self.partitions: dict[int, Partition] = {}
        self._inbox: list[tuple[Partition, Any]] = []
        # subject, answer, its sample's sequence, its partition
        self._out: deque[tuple[str, bytes, int, Partition]] = deque()
        self._wake_writer = asyncio.Event()
        self._idle_writer = asyncio.Event()
        self._idle_writer.set()
        self._ready = asyncio.Event()
        self._reading = True
        self._retake_pending = False
        self._unreachable_said = False
        self._locks: dict[int, asyncio.Lock] = {}
        self._unacked: set[asyncio.Future[Any]] = set()
        self._failures = 0  # answers that may not have reached the cluster, so far
        self._cancelling = False
        self._slice = config.max_batch  # messages per parcel at most
        self._tasks: list[asyncio.Task[Any]] = []
        self._out_prefix, self._out_suffix = config.nats_out.split("{id}", 1)
        self.nc: Any = None  # samples in, answers out
        self.control: Any = None  # leases and checkpoints
        self.leases: Leases | None = None
        self.checkpoints: PartitionCheckpoints | None = None
        self.moved = {"gained": 0, "let_go": 0, "lost": 0}
        self.last_gain_seconds: float | None = None

    # -- the daemon's side ------------------------------------------------------------------

    def waiting_for(self) -> str | None:
        if self._ready.is_set():
            return None
        return f"the NATS cluster at {','.join(self.servers)}"

    async def until_ready(self) -> None:
        await self._ready.wait()

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._run_or_fail(), name="nats"))
        self._tasks.append(asyncio.create_task(self._write_answers(), name="nats-answers"))

    def stop_reading(self) -> None:
        """On the way out: samples that come now are left in the stream, for the partition's
        next owner (what was read is still answered)."""
        self._reading = False

    async def stop(self) -> None:
        """Every partition checkpointed and let go (the survivors take them at once), answers
        flushed, the connection drained."""
        for task in self._tasks[:1]:
            task.cancel()
        if self.control is not None and self.control.is_connected and self.leases is not None:
            try:
                await asyncio.wait_for(self.leases.release_all(), 10 + 0.02 * len(self.partitions))
            except (*NATS_FAILURES, EdgeseqError) as exc:
                log.warning(
                    "partitions not all let go; they move after the lease TTL",
                    extra={"detail": f"{type(exc).__name__}: {exc}"},
                )
        await self._answers_out()
        for task in self._tasks:
            task.cancel()
        for nc in (self.nc, self.control):
            if nc is not None:
                with contextlib.suppress(*NATS_FAILURES, asyncio.CancelledError):
                    await asyncio.wait_for(nc.drain(), 5)

    # -- connecting, the lease rounds, checkpoints --------------------------------------------

    async def _run_or_fail(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a defect: the daemon must not go on without its partitions
            log.exception("the NATS transport failed")
            self.fatal(exc)

    async def _run(self) -> None:
        await self._connect()
        assert self.nc is not None
        self.js = self.nc.jetstream(timeout=5.0)
        max_value = int(self.control.max_payload)
        try:
            leases_kv, checkpoints_kv = await ensure(
                self.control.jetstream(timeout=5.0), self.layout, max_value
            )
        except EdgeseqError as exc:
            self.fatal(exc)
            return
        fingerprint = self.table.model.fingerprint
        self.checkpoints = PartitionCheckpoints(
            checkpoints_kv, fingerprint, self.name, self.config.reset_on_model_change, max_value
        )
        self.leases = Leases(
            leases_kv,
            self.name,
            self.layout.partitions,
            self.layout.lease_ttl,
            self._gain,
            self._let_go,
            self._lost,
        )
        log.info(
            "joining the cluster",
            extra={
                "daemon": self.name,
                "stream": self.layout.stream,
                "partitions": self.layout.partitions,
            },
        )
        checkpointing = asyncio.create_task(self._checkpoint_forever(), name="nats-checkpoints")
        self._tasks.append(checkpointing)
        while True:
            started = time.monotonic()
            try:
                await self.leases.beat()
            except CheckpointError as exc:  # a partition's checkpoint we must not overwrite
                self.fatal(exc)
                return
            except NATS_FAILURES as exc:
                log.warning(
                    "lease round failed; retrying", extra={"detail": f"{type(exc).__name__}: {exc}"}
                )
            refused = [e for e in self.leases.failures if isinstance(e, CheckpointError)]
            self.leases.failures.clear()
            if refused:  # a checkpoint of another model, or one that does not fit the table
                self.fatal(refused[0])
                return
            if self.leases.beats >= 2 and not self.leases.moving and not self._ready.is_set():
                self._ready.set()
                log.info(
                    "partitions owned",
                    extra={"count": len(self.partitions), "members": len(self.leases.members)},
                )
            await asyncio.sleep(max(0.0, self.leases.every - (time.monotonic() - started)))

    async def _connect(self) -> None:
        """Two connections: samples and answers on one, leases and checkpoints on the other.
        A lease renewal must not wait behind the samples the server is pushing to this daemon
        (on one connection it did, for seconds, and the leases expired under load)."""
        self.nc = await self._connect_one("data", self._disconnected, self._reconnected)
        self.control = await self._connect_one("control", None, None)

    async def _connect_one(self, role: str, disconnected: Any, reconnected: Any) -> Any:
        callbacks = {"disconnected_cb": disconnected, "reconnected_cb": reconnected}
        while True:
            try:
                nc = await nats.connect(
                    servers=self.servers,
                    name=f"edgeseq-serve {self.name} {role}",
                    connect_timeout=2,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=RETRY,
                    allow_reconnect=True,
                    error_cb=self._error,
                    **{k: v for k, v in callbacks.items() if v is not None},
                )
                self._unreachable_said = False
                server = nc.connected_url.netloc if nc.connected_url is not None else "?"
                log.info("nats connected", extra={"server": server, "role": role})
                return nc
            except NATS_FAILURES as exc:
                if not self._unreachable_said:
                    self._unreachable_said = True
                    log.warning(
                        "cannot reach the NATS cluster yet; retrying",
                        extra={"detail": f"{type(exc).__name__}: {exc}"},
                    )
                await asyncio.sleep(RETRY)

    async def _disconnected(self) -> None:
        if self._reading:  # not our own drain on the way out
            log.warning("nats disconnected; reconnecting")

    async def _reconnected(self) -> None:
        """Answers written just before the connection dropped may not have reached the server:
        take every partition again from its checkpoint, so that they are published again."""
        self._unreachable_said = False
        log.warning(
            "nats reconnected",
            extra={"server": str(self.nc.connected_url.netloc), "partitions": len(self.partitions)},
        )
        self._schedule_retake()

    def _schedule_retake(self) -> None:
        if not self._retake_pending:
            self._retake_pending = True
            asyncio.get_running_loop().create_task(self._retake_all())

    def _answer_failed(self) -> None:
        """An answer may not have reached the cluster: every partition is taken again from its
        checkpoint (which cannot cover it: see _checkpoint), so that it is published again."""
        self._failures += 1
        self._schedule_retake()

    async def _error(self, exc: Exception) -> None:
        """The client's errors: while no server answers it retries every RETRY seconds, said
        once per outage; anything else is said as it comes."""
        detail = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, OSError | asyncio.TimeoutError):
            if not self._unreachable_said:
                self._unreachable_said = True
                log.warning("cannot reach the NATS cluster yet; retrying", extra={"detail": detail})
            return
        log.warning("nats client error", extra={"detail": detail})

    async def _retake_all(self) -> None:
        self._retake_pending = False
        self._cancelling = True  # answers awaiting an ack that will not come: slots back
        for future in list(self._unacked):
            future.cancel()
        self._unacked.clear()
        self._cancelling = False
        for number in sorted(self.partitions):
            try:
                async with self._lock(number):
                    part = self.partitions.get(number)
                    if part is None:
                        continue
                    await self._take_up(number)
            except (*NATS_FAILURES, EdgeseqError) as exc:
                log.error(
                    "partition not taken again after reconnecting; letting it go",
                    extra={"partition": number, "detail": f"{type(exc).__name__}: {exc}"},
                )
                if self.leases is not None:
                    self.leases.held.pop(number, None)  # expires; a survivor takes it

    async def _checkpoint_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.nats_checkpoint_interval)
            for number in sorted(self.partitions):
                async with self._lock(number):
                    await self._checkpoint_one(number)

    async def _checkpoint_one(self, number: int) -> None:
        part = self.partitions.get(number)
        if part is None:
            return
        try:
            await self._checkpoint(part)
        except Superseded:
            log.warning(
                "partition checkpointed by another daemon; letting it go",
                extra={"partition": number},
            )
            await self._drop(part)
            self.moved["lost"] += 1
            if self.leases is not None:
                self.leases.held.pop(number, None)
        except CheckpointError as exc:
            log.error(
                "partition checkpoint failed", extra={"partition": number, "detail": str(exc)}
            )
        except NATS_FAILURES as exc:
            log.warning(
                "partition checkpoint not written; retrying",
                extra={"partition": number, "detail": f"{type(exc).__name__}: {exc}"},
            )

    async def _checkpoint(self, part: Partition) -> None:
        """The partition's states as they are now, once every answer they cover has reached
        the server."""
        if part.applied == part.written or self.checkpoints is None:
            return
        covers = part.applied
        states, extra = self.table.snapshot(part.ids)  # no await since `applied` was read
        part.ids = set(extra["seq"])  # streams ended or evicted are gone
        await self._answers_out()
        if part.epoch != self._failures:  # an answer it covers may be lost: retaken instead
            raise AnswersLost("answers not acknowledged; the partition is taken again")
        await self.nc.flush(timeout=5)
        await self.checkpoints.write(part.number, states, extra, covers)
        part.written = max(part.written, covers)

    async def _answers_out(self) -> None:
        """Until every answer queued so far is handed to the connection (and, stored in the
        answers' stream, acknowledged or given up: _answer_failed counts those)."""
        while self._out or not self._idle_writer.is_set():
            self._wake_writer.set()
            await asyncio.sleep(0.001)
        if self._unacked:
            _, late = await asyncio.wait(set(self._unacked), timeout=ACK_WAIT)
            for future in late:  # the server that had them died: give their slots back
                future.cancel()

    # -- partitions coming and going ----------------------------------------------------------

    def _lock(self, number: int) -> asyncio.Lock:
        """One partition's comings and goings (a claim, a hand-over, a loss, a retake after
        reconnecting, a checkpoint) happen one at a time: two subscriptions of one partition
        would apply its samples twice."""
        return self._locks.setdefault(number, asyncio.Lock())

    async def _gain(self, number: int) -> None:
        async with self._lock(number):
            await self._take_up(number)

    async def _take_up(self, number: int) -> None:
        """Restore the partition from its checkpoint and read on from the sequence after it
        (a partition still held here is dropped first: this is also the retake)."""
        assert self.checkpoints is not None
        held = self.partitions.get(number)
        if held is not None:
            await self._drop(held)
        started = time.perf_counter()
        restored = await self.checkpoints.read(number)
        ids: set[str] = set()
        if restored.snapshot is not None:
            self.table.restore(restored.snapshot)
            ids = set(restored.snapshot.ids)
        part = Partition(number, restored.covers, restored.covers, ids=ids, epoch=self._failures)
        self.partitions[number] = part
        part.sub = await self._subscribe(part)
        self.moved["gained"] += 1
        self.last_gain_seconds = time.perf_counter() - started
        log.info(
            "partition taken",
            extra={
                "partition": number,
                "streams": len(ids),
                "from_sequence": restored.covers + 1,
                "seconds": round(self.last_gain_seconds, 3),
            },
        )

    async def _subscribe(self, part: Partition) -> Any:
        async def take(msg: Any) -> None:
            if not part.closed and self._reading:
                if not self._inbox:
                    asyncio.get_running_loop().call_soon(self._arrive)
                self._inbox.append((part, msg))
                if len(self._inbox) >= self._slice:  # a burst: hand it over, let others run
                    self._arrive()
                    await asyncio.sleep(0)
                if self.batcher.full:
                    await self.batcher.room()  # this partition waits; JetStream flow control

        start = part.applied + 1
        policy = DeliverPolicy.BY_START_SEQUENCE if part.applied else DeliverPolicy.ALL
        config = ConsumerConfig(opt_start_seq=start) if part.applied else ConsumerConfig()
        return await self.js.subscribe(
            self.layout.part_subject(part.number),
            stream=self.layout.stream,
            cb=take,
            ordered_consumer=True,
            deliver_policy=policy,
            config=config,
            pending_msgs_limit=PENDING_MESSAGES,
            pending_bytes_limit=64 << 20,
        )

    async def _let_go(self, number: int) -> None:
        """Hand a partition over: its last checkpoint, then its streams leave the table."""
        async with self._lock(number):
            part = self.partitions.get(number)
            if part is None:
                return
            await self._quiesce(part)
            # A last checkpoint when it can be written; without it (superseded, answers not
            # acknowledged, the cluster unreachable) the next owner replays from the previous
            # one. Either way the partition leaves: one kept here closed would be read by
            # nobody while its lease stays renewed.
            with contextlib.suppress(Superseded, *NATS_FAILURES):
                await self._checkpoint(part)
            self._forget(part)
        self.moved["let_go"] += 1
        log.info("partition handed over", extra={"partition": number, "streams": len(part.ids)})

    async def _lost(self, number: int) -> None:
        async with self._lock(number):
            part = self.partitions.get(number)
            if part is not None:
                await self._drop(part)
                self.moved["lost"] += 1

    async def _drop(self, part: Partition) -> None:
        """Stop reading the partition, wait for what it queued, drop its streams."""
        await self._quiesce(part)
        self._forget(part)

    async def _quiesce(self, part: Partition) -> None:
        part.closed = True  # messages of its subscription still on their way are ignored
        if part.sub is not None:
            with contextlib.suppress(*NATS_FAILURES):
                await part.sub.unsubscribe()
        self._arrive()  # whatever it put in the inbox goes to the batcher, to be answered
        while part.inflight > 0:
            part.drained.clear()
            await part.drained.wait()

    def _forget(self, part: Partition) -> None:
        if self.partitions.get(part.number) is part:
            del self.partitions[part.number]
        self.table.forget(part.ids)
        if self.checkpoints is not None:
            self.checkpoints.forget(part.number)

    # -- samples in, answers out --------------------------------------------------------------

    def _arrive(self) -> None:
        """Every message that has come since the last call, as one parcel."""
        inbox, self._inbox = self._inbox, []
        if not inbox:
            return
        width, limit = self.batcher.width, self.config.max_line_bytes
        prefix = len(self.layout.part_prefix)
        entries: list[Entry] = []
        context: list[tuple[Partition, int, str]] = []
        for part, msg in inbox:
            sid = msg.subject[prefix:].partition(".")[2]
            try:
                message, checked_text = addressed_message(sid, msg.data, limit)
                entries.append(read_message(message, width, checked_text))
            except BadMessage as bad:
                entries.append(refusal(bad))
            except Exception as exc:  # a defect: this message is refused, the rest carry on
                detail = f"the message could not be read: {type(exc).__name__}"
                entries.append(refusal(BadMessage("internal", detail, sid)))
            context.append((part, stream_sequence(msg.reply), sid))
            part.inflight += 1
        self.batcher.put(Parcel(self, entries, context=context))

    def deliver(self, parcel: Parcel, lines: bytes) -> None:
        out, prefix, suffix = self._out, self._out_prefix, self._out_suffix
        answers = lines.split(b"\n")[:-1]
        for (part, sequence, sid), body in zip(parcel.context, answers, strict=True):
            part.inflight -= 1
            if part.inflight == 0:
                part.drained.set()
            part.applied = sequence
            part.ids.add(sid)
            if body.startswith(b'{"id":null'):  # refused before its id was read: the subject's
                body = b'{"id":' + encode(sid)[:-1] + body[10:]
            out.append((f"{prefix}{sid}{suffix}", body, sequence, part))
        self._wake_writer.set()

    async def _write_answers(self) -> None:
        """Answers to the connection, in order. While it is down they wait in the client's
        buffer; past that buffer they are dropped, and come again when the partitions are taken
        again from their checkpoints after reconnecting."""
        out, stored = self._out, self.config.nats_answers == "stream"
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            self._idle_writer.clear()
            try:
                while out:
                    subject, body, sequence, part = out.popleft()
                    if part.epoch != self._failures:
                        continue  # its partition is taken again: this answer comes again
                    try:
                        if stored:
                            await self._store_answer(subject, body, sequence)
                        else:
                            await self.nc.publish(subject, body)
                    except NATS_FAILURES as exc:
                        self._answer_failed()
                        log.debug("answer not published", extra={"detail": str(exc)})
            finally:
                self._idle_writer.set()

    async def _store_answer(self, subject: str, body: bytes, sequence: int) -> None:
        """Into the answers' stream, acknowledged: a replay's identical answer (same sample,
        same Nats-Msg-Id) is stored once."""
        headers = {"Nats-Msg-Id": f"{sequence}"}
        future = await self.js.publish_async(subject, body, headers=headers, wait_stall=ACK_WAIT)
        self._unacked.add(future)
        future.add_done_callback(self._acked)

    def _acked(self, future: asyncio.Future[Any]) -> None:
        self._unacked.discard(future)
        if self._cancelling:
            return
        if future.cancelled() or future.exception() is not None:
            self._answer_failed()
