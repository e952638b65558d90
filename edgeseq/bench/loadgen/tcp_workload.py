"""Loopback TCP load: many streams pipelined over a few connections, one stream in a closed loop.

Many streams are dealt round-robin to the connections. Each connection has a writer thread, which
sends a tick (one sample of each of its streams, one pre-built block) whenever fewer than
IN_FLIGHT ticks await their answers, and a reader thread, which counts answers by newline in bulk
recv()s and error answers by their bytes. A tick's latency runs from sending its block until the
connection has read as many answers as it had sent lines up to that tick. (Answers of different
streams may be reordered: that count can be reached while one of the tick's own answers is still
on its way behind a later answer of another stream. Under steady load the two agree closely.)
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Callable

from edgeseq.bench.loadgen.figures import Throughput, latency_us
from edgeseq.bench.loadgen.wire_lines import LineCounter, TickBlocks, stream_ids
from edgeseq.errors import EdgeseqError

HOST = "127.0.0.1"
IN_FLIGHT = 4  # ticks a connection sends ahead of its answers
CHUNK = 1 << 20  # bytes a reader asks for at once
CONNECT_TIMEOUT = 10.0
DRAIN = 30.0  # seconds the last answers may take once the writers stop (also sendall's limit)
POLL = 0.25  # a reader's recv timeout: how soon it notices that its writer has stopped
SOLO_MAX = 10_000_000  # samples of the closed loop, at most

Progress = Callable[[float, int], None]  # (seconds since the start, answers so far)


class _Connection:
    """One connection's writer and reader, and what they counted."""

    def __init__(self, port: int, ids: list[str], n_features: int, seed: int) -> None:
        self.blocks = TickBlocks(ids, n_features, seed)
        self.sock = socket.create_connection((HOST, port), timeout=CONNECT_TIMEOUT)
        self.sock.settimeout(DRAIN)
        self.reading = self.sock.dup()  # its own timeout, so that the writer keeps a long one
        self.reading.settimeout(POLL)
        self.window = threading.Semaphore(IN_FLIGHT)
        self.sent_at: list[float] = []  # perf_counter() when each tick was sent
        self.latencies: list[float] = []
        self.counter = LineCounter()
        self.stopped = threading.Event()
        self.deadline = 0.0  # set before the start
        self.last_answer = 0.0
        self.failure: str | None = None

    @property
    def sent(self) -> int:
        return len(self.sent_at) * self.blocks.per_tick

    def write(self, start: threading.Event) -> None:
        try:
            if not start.wait(CONNECT_TIMEOUT):
                return
            tick = 0
            while (left := self.deadline - time.perf_counter()) > 0:
                if not self.window.acquire(timeout=left):
                    break
                block = self.blocks.block(tick)
                self.sent_at.append(time.perf_counter())
                self.sock.sendall(block)
                tick += 1
        except OSError as exc:
            self.failure = f"sending: {exc!r}"
        finally:
            self.stopped.set()

    def read(self) -> None:
        per_tick, done, give_up = self.blocks.per_tick, 0, float("inf")
        while True:
            if self.stopped.is_set():
                if self.counter.lines >= self.sent:
                    return
                give_up = min(give_up, time.perf_counter() + DRAIN)
                if time.perf_counter() > give_up:
                    return
            try:
                chunk = self.reading.recv(CHUNK)
            except TimeoutError:
                continue
            except OSError as exc:
                self.failure = f"reading: {exc!r}"
                return
            if not chunk:
                self.failure = None if self.counter.lines >= self.sent else "the server hung up"
                return
            now = self.last_answer = time.perf_counter()
            self.counter.feed(chunk)
            while done < len(self.sent_at) and self.counter.lines >= (done + 1) * per_tick:
                self.latencies.append(now - self.sent_at[done])
                done += 1
                self.window.release()

    def close(self) -> None:
        self.reading.close()
        self.sock.close()


def many_streams(
    port: int,
    n_features: int,
    streams: int,
    connections: int,
    seconds: float,
    progress: Progress | None = None,
) -> Throughput:
    """`streams` streams over `connections` connections for `seconds`, then the last answers."""
    ids = stream_ids("sensor", streams)
    count = max(1, min(connections, streams))
    conns: list[_Connection] = []
    try:
        for c in range(count):
            conns.append(_Connection(port, ids[c::count], n_features, seed=c))
        return _drive(conns, seconds, progress)
    finally:
        for conn in conns:
            conn.close()


def _drive(conns: list[_Connection], seconds: float, progress: Progress | None) -> Throughput:
    start = threading.Event()
    threads = [threading.Thread(target=conn.write, args=(start,), daemon=True) for conn in conns]
    threads += [threading.Thread(target=conn.read, daemon=True) for conn in conns]
    for thread in threads:
        thread.start()
    begin, cpu = time.perf_counter(), time.process_time()
    for conn in conns:
        conn.deadline = begin + seconds
    start.set()
    give_up = begin + seconds + 2 * DRAIN + CONNECT_TIMEOUT
    while (alive := [t for t in threads if t.is_alive()]) and time.perf_counter() < give_up:
        alive[0].join(0.5)
        if progress is not None:
            progress(time.perf_counter() - begin, sum(c.counter.lines for c in conns))
    figure = _tally(conns)
    used = (time.process_time() - cpu) / (time.perf_counter() - begin)
    return dataclasses.replace(figure, generator_cpu=used)


def _tally(conns: list[_Connection]) -> Throughput:
    failures = [c.failure for c in conns if c.failure is not None]
    first = min((c.sent_at[0] for c in conns if c.sent_at), default=0.0)
    last = max(c.last_answer for c in conns)
    sent = sum(c.sent for c in conns)
    answered = sum(c.counter.lines for c in conns)
    if answered == 0:
        raise EdgeseqError(f"no answer at all to {sent:,} samples {failures or ''}".strip())
    p50, p99 = latency_us([s for c in conns for s in c.latencies])
    errors = [c.counter.first_mark for c in conns if c.counter.first_mark is not None]
    return Throughput(
        samples=min(answered, sent),
        seconds=last - first,
        p50_us=p50,
        p99_us=p99,
        errors=sum(c.counter.marks for c in conns),
        lost=max(sent - answered, 0),
        duplicates=max(answered - sent, 0),
        first_error=next(iter(errors + failures), None),
    )


def one_stream(port: int, n_features: int, seconds: float) -> Throughput:
    """One stream, closed loop (TCP_NODELAY): send a sample, wait for its answer, repeat."""
    blocks = TickBlocks(["solo"], n_features, seed=99)
    counter, latencies = LineCounter(), []
    with socket.create_connection((HOST, port), timeout=CONNECT_TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(DRAIN)
        begin = time.perf_counter()
        deadline = begin + seconds
        for seq in range(SOLO_MAX):
            line = blocks.block(seq)
            sent = time.perf_counter()
            if sent >= deadline:
                break
            sock.sendall(line)
            while counter.lines <= seq:  # each recv() returns bytes or raises after DRAIN
                chunk = sock.recv(CHUNK)
                if not chunk or time.perf_counter() > deadline + DRAIN:
                    raise EdgeseqError(f"the server stopped answering after {seq:,} samples")
                counter.feed(chunk)
            latencies.append(time.perf_counter() - sent)
        elapsed = time.perf_counter() - begin
    p50, p99 = latency_us(latencies)
    return Throughput(
        len(latencies), elapsed, p50, p99, errors=counter.marks, first_error=counter.first_mark
    )
