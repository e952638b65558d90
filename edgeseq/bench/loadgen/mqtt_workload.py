"""MQTT through a Mosquitto broker, with Mosquitto's own C clients as the fleet and the consumer.

Each stream has one `mosquitto_pub -l`, publishing every line written to its stdin; one
`mosquitto_sub` prints every message it receives as a line. Two routes per QoS, same clients:
- broker only: the pubs publish to `loadgen/<id>/direct`, which the consumer subscribes to;
- daemon: the pubs publish to `edgeseq/<id>/in`, the daemon answers on `edgeseq/<id>/out`.
Before the clock starts, the consumer is proven subscribed (a probe message reaches it) and every
pub connected (each stream's seq 0 comes back). Then the rest of every stream's lines are written
at once; the clock runs from there to the last answer. Answers are parsed only afterwards, to
count what was lost and what came twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from edgeseq.bench.loadgen.broker import HOST, ensure_mosquitto, find, start_broker, stop_broker
from edgeseq.bench.loadgen.children import close_pipes, end, start_daemon
from edgeseq.bench.loadgen.figures import MqttRun, Throughput
from edgeseq.bench.loadgen.wire_lines import LineCounter, encode_line, samples, stream_ids
from edgeseq.errors import EdgeseqError

STREAMS, SAMPLES = 20, 5000  # per run: 20 sensors, 5,000 samples each after the first
PROBE = "loadgen/probe"
PROBES = 50  # probe messages at most before the consumer counts as unreachable
WARM_TIMEOUT = 30.0  # seconds for every stream's first answer
RUN_TIMEOUT = 300.0  # seconds for the whole run, at most
IDLE = 5.0  # seconds without a message after which the missing ones count as lost
EXIT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Route:
    name: str
    topic: str  # where stream {id} publishes
    pattern: str  # what the consumer subscribes to


DIRECT = Route("broker only", "loadgen/{id}/direct", "loadgen/+/direct")
DAEMON = Route("daemon", "edgeseq/{id}/in", "edgeseq/+/out")


class _Consumer:
    """mosquitto_sub, its stdout read by a thread: chunks kept, answers counted by `"seq"`."""

    def __init__(self, port: int, qos: int, pattern: str) -> None:
        name = f"loadgen-sub-{os.getpid()}-{qos}"
        cmd = _cmd("mosquitto_sub", port, "-q", str(qos), "-t", pattern, "-t", PROBE, "-i", name)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.counter, self.chunks, self.last = LineCounter(b'"seq"'), list[bytes](), 0.0
        self.probed, self.changed = threading.Event(), threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 1 << 20):  # ends when mosquitto_sub exits
            with self.changed:
                self.last = time.perf_counter()
                self.chunks.append(chunk)
                self.counter.feed(chunk)
                if b"probe" in chunk:
                    self.probed.set()
                self.changed.notify_all()

    def wait_for(self, answers: int, timeout: float, idle: float = IDLE) -> None:
        """Until `answers` answers arrived, or none for `idle` s, or `timeout` s in all."""
        deadline = time.perf_counter() + timeout
        with self.changed:
            while self.counter.marks < answers:
                now = time.perf_counter()
                if now > deadline or (self.last and now - self.last > idle):
                    return
                self.changed.wait(0.1)

    def stop(self) -> bytes:
        end(self.proc, EXIT_TIMEOUT)
        self.reader.join(EXIT_TIMEOUT)
        close_pipes(self.proc)
        with self.changed:
            return b"".join(self.chunks)


def _cmd(client: str, port: int, *args: str) -> list[str]:
    """A Mosquitto client's command line, to the broker on `port` of 127.0.0.1."""
    found = find(client)
    if found is None:
        raise EdgeseqError(f"{client} is missing: install Debian's mosquitto-clients")
    return [found, "-h", HOST, "-p", str(port), *args]


def _probe(port: int, consumer: _Consumer) -> None:
    """Publish probes until one reaches the consumer: then it is subscribed."""
    cmd = _cmd("mosquitto_pub", port, "-t", PROBE, "-m", "probe")
    for _ in range(PROBES):
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
        if consumer.probed.wait(0.2):
            return
    raise EdgeseqError(f"mosquitto_sub on port {port} received none of {PROBES} probes")


def route_rate(
    port: int, qos: int, route: Route, n_features: int, streams: int = STREAMS, count: int = SAMPLES
) -> Throughput:
    """`streams` pubs, each publishing seq 0 (the warm-up) then `count` samples, through `route`."""
    ids = stream_ids("m", streams)
    xs = samples(count + 1, n_features, seed=5).tolist()
    data = [b"".join(encode_line(sid, seq, xs[seq]) for seq in range(1, count + 1)) for sid in ids]
    consumer = _Consumer(port, qos, route.pattern)
    pubs: list[subprocess.Popen[bytes]] = []
    try:
        _probe(port, consumer)
        for sid in ids:
            cmd = _cmd(
                "mosquitto_pub", port, "-q", str(qos), "-t", route.topic.format(id=sid), "-l"
            )
            quiet = subprocess.DEVNULL
            pubs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=quiet, stderr=quiet))
            _send(pubs[-1].stdin, encode_line(sid, 0, xs[0]), close=False)
        consumer.wait_for(streams, WARM_TIMEOUT, idle=WARM_TIMEOUT)
        if consumer.counter.marks < streams:
            raise EdgeseqError(f"{route.name}: {consumer.counter.marks} of {streams} streams' "
                               f"first samples came back within {WARM_TIMEOUT:.0f} s")  # fmt: skip
        begin = time.perf_counter()
        for pub, chunk in zip(pubs, data, strict=True):
            threading.Thread(target=_send, args=(pub.stdin, chunk), daemon=True).start()
        consumer.wait_for(streams * (count + 1), RUN_TIMEOUT)
        last = consumer.last
    finally:
        for pub in pubs:
            end(pub, EXIT_TIMEOUT)
            close_pipes(pub)
        received = consumer.stop()
    return _tally(received, ids, count, last - begin)


def _send(sink: IO[bytes] | None, data: bytes, close: bool = True) -> None:
    assert sink is not None
    try:
        sink.write(data)
        sink.flush()
        if close:
            sink.close()
    except (OSError, ValueError):
        pass  # the pub died: its samples will count as lost


def _tally(received: bytes, ids: list[str], count: int, seconds: float) -> Throughput:
    """Parse the consumer's output: each stream's seq 1..count once, the rest lost or twice."""
    expected = {(sid, seq) for sid in ids for seq in range(1, count + 1)}
    seen, errors, first_error = [], 0, None
    for line in received.split(b"\n"):
        try:
            answer = json.loads(line) if line.startswith(b"{") else None
        except ValueError:
            answer = None  # not a message of ours: counted as neither answer nor loss
        if not isinstance(answer, dict):
            continue
        if "error" in answer:
            errors += 1
            first_error = first_error or line[:300].decode("utf-8", "replace")
        seen.append((answer.get("id"), answer.get("seq")))
    unique = expected.intersection(seen)
    answered = sum(1 for key in seen if key in expected)
    return Throughput(
        samples=len(unique),
        seconds=seconds,
        errors=errors,
        lost=len(expected) - len(unique),
        duplicates=answered - len(unique),
        first_error=first_error,
    )


Say = Callable[[str], None]


def mqtt_runs(
    model: Path,
    n_features: int,
    qos_levels: tuple[int, ...] = (1, 0),
    streams: int = STREAMS,
    count: int = SAMPLES,
    say: Say | None = None,
) -> list[MqttRun]:
    """For each QoS: the broker-only route, then the daemon's, on a broker started here."""
    binary = ensure_mosquitto(clients=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="edgeseq-loadtest-") as folder:
        broker, port = start_broker(binary, Path(folder))
        try:
            for qos in qos_levels:
                if say is not None:
                    say(f"MQTT QoS {qos}: broker only, {streams} x {count:,} samples")
                direct = route_rate(port, qos, DIRECT, n_features, streams, count)
                if say is not None:
                    say(f"MQTT QoS {qos}: through edgeseq serve, {streams} x {count:,} samples")
                runs.append(
                    MqttRun(qos, direct, _via_daemon(model, port, qos, n_features, streams, count))
                )
        finally:
            stop_broker(broker)
    return runs


def _via_daemon(
    model: Path, port: int, qos: int, n_features: int, streams: int, count: int
) -> Throughput:
    client_id = f"edgeseq-loadtest-{os.getpid()}-q{qos}"  # a fresh session each run
    options = f"--mqtt mqtt://{HOST}:{port} --mqtt-qos {qos} --mqtt-client-id {client_id}"
    with start_daemon(model, *options.split(), "--max-streams", str(streams + 16)) as daemon:
        daemon.wait_for("ready")
        return route_rate(port, qos, DAEMON, n_features, streams, count)
