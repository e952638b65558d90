"""kill -9, again and again, under the load of a client that follows the protocol to the letter.

The daemon checkpoints every 20 ms to a state dir; the test kills it with SIGKILL at random
instants while 20-50 streams flow, and starts it again on the same dir. Streams begin all
through the run (a stream that began after the last checkpoint is unknown after the restart:
the daemon must say `resend` from 0, never apply its seq 9 to a zero state). The client:

- sends each stream's samples in order, seq 0, 1, 2, ..., a few in flight per stream;
- on `resend`, sends again from `resend_from`; ignores `stale`; takes duplicates as answers;
- on connection loss, reconnects once the daemon is back and sends every sample after the last
  one it holds an answer for (for half the streams, that last one too).

Every y it ever receives (before a crash, after it, duplicates too) must equal `Stream.feed`
over that stream's samples up to that seq: a state restored from the wrong instant, a sample
applied twice or skipped, shows up as a wrong number. `durable` (the stream's seq in the last
completed checkpoint) must never go back, and a restart must never ask for a sample the daemon
had called durable: a client may have forgotten it.
"""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.daemon_harness import DEFAULT_MODEL, DaemonProcess
from tests.wire_fuzz import TOL, offline

pytestmark = pytest.mark.timeout(120)

WINDOW = 4  # samples in flight per stream
FIRST = 4  # streams that begin at once; the others begin at random points of the run
SILENCE = 30.0  # seconds without an answer from a live daemon: the test fails


# -- the client ---------------------------------------------------------------------------------


@dataclass
class Stream:
    """One stream as the client sees it: all its samples (kept: the simplest reading of
    'keep every sample not yet durable') and what has come back."""

    sid: str
    xs: np.ndarray  # (T, 3) float32
    ys: np.ndarray  # (T, n_out) Stream.feed's predictions
    begins_at: int  # the stream begins once the client holds this many y answers
    cursor: int = 0  # the next seq to send
    answered: int = -1  # the highest seq it holds a y answer for
    durable: int = -1  # the highest "durable" seen
    epoch: int = 0  # bumped at each rewind: answers to older sends cannot rewind again
    in_flight: deque[tuple[int, int]] = field(default_factory=deque)  # (seq, epoch), sent order
    active: bool = False

    @property
    def done(self) -> bool:
        return self.answered == len(self.xs) - 1

    def line(self, seq: int) -> bytes:
        return json.dumps({"id": self.sid, "seq": seq, "x": self.xs[seq].tolist()}).encode()


class ProtocolClient:
    """Streams over one connection at a time; answers arrive on a queue from a reader thread
    per connection, tagged with its number; None marks the end of a connection."""

    def __init__(self, streams: list[Stream], rng: np.random.Generator) -> None:
        self.streams = {s.sid: s for s in streams}
        self.rng = rng
        self.answers: queue.Queue[tuple[int, bytes | None]] = queue.Queue()
        self.sock: socket.socket | None = None
        self.connection = 0
        self.counts: Counter[str] = Counter()
        self.problems: list[str] = []

    def complain(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text)

    def connect(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=SILENCE)
        self.connection += 1
        reading = self.sock.dup()
        args = (reading, self.connection, self.answers)
        threading.Thread(target=_read_answers, args=args, daemon=True).start()

    def lost(self) -> None:
        """The connection is gone (or given up): nothing is in flight; every stream goes on
        after the last seq it holds an answer for, half of them (drawn at random) from that
        seq itself, to see duplicates and stale seqs answered after a restart too."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for stream in self.streams.values():
            stream.in_flight.clear()
            stream.epoch += 1
            again = stream.answered >= 0 and self.rng.random() < 0.5
            stream.cursor = stream.answered + 1 - again

    def pump(self) -> None:
        """Fill every active stream's window; one write."""
        lines = []
        for s in self.streams.values():
            if s.active and not s.in_flight and not s.done:
                s.cursor = min(s.cursor, s.answered + 1)  # nothing in flight and not done
            while s.active and len(s.in_flight) < WINDOW and s.cursor < len(s.xs):
                lines.append(s.line(s.cursor))
                s.in_flight.append((s.cursor, s.epoch))
                s.cursor += 1
        if lines and self.sock is not None:
            try:
                self.sock.sendall(b"\n".join(lines) + b"\n")
            except OSError:  # the daemon died: the reader reports the end of the connection
                self.sock.close()
                self.sock = None

    def take(self, raw: bytes) -> None:
        self.counts["answers"] += 1
        try:
            answer = json.loads(raw)
            stream = self.streams.get(answer["id"])
        except (ValueError, TypeError, KeyError):
            self.complain(f"an answer that is not JSON with a string id: {raw[:200]!r}")
            return
        if stream is None or not stream.in_flight:
            self.complain(f"an answer to nothing in flight: {answer}")
            return
        seq, epoch = stream.in_flight.popleft()
        if answer.get("seq") != seq:
            self.complain(f"{stream.sid}: seq {seq} was next to be answered, got {answer}")
        elif "error" in answer:
            self._refused(stream, seq, epoch, answer)
        else:
            self._answered(stream, seq, answer)

    def _answered(self, stream: Stream, seq: int, answer: dict[str, Any]) -> None:
        if "y" not in answer:
            self.complain(f"{stream.sid}: an answer to a sample without y: {answer}")
            return
        gap = np.abs(np.asarray(answer.get("y"), np.float64) - stream.ys[seq]).max()
        if not gap <= TOL:
            self.complain(f"{stream.sid} seq {seq}: y off Stream.feed by {gap:.3g}: {answer}")
        self.counts["y checked"] += 1
        self.counts["duplicates"] += bool(answer.get("duplicate"))
        stream.answered = max(stream.answered, seq)
        durable = answer.get("durable")
        if durable is None:
            return
        if not isinstance(durable, int) or not stream.durable <= durable <= seq:
            self.complain(f"{stream.sid}: durable {durable!r} after {stream.durable}: {answer}")
        self.counts["durable"] += 1
        stream.durable = max(stream.durable, durable if isinstance(durable, int) else -1)

    def _refused(self, stream: Stream, seq: int, epoch: int, answer: dict[str, Any]) -> None:
        code = answer["error"].get("code")
        if code == "stale":
            self.counts["stale"] += 1
            return
        if code != "resend":
            self.complain(f"{stream.sid}: unexpected error: {answer}")
            return
        start = answer["error"].get("resend_from")
        if not isinstance(start, int) or not stream.durable < start <= seq:
            self.complain(
                f"{stream.sid}: resend_from {start!r} for seq {seq}, after durable "
                f"{stream.durable} was said: {answer}"
            )
            return
        if epoch == stream.epoch:  # later sends of the same epoch get the same answer
            stream.cursor, stream.epoch = start, stream.epoch + 1
            self.counts["resends honoured"] += 1


def _read_answers(sock: socket.socket, connection: int, out: queue.Queue) -> None:
    """Every answer line of one connection onto `out`, then None (closed, reset or silent)."""
    rest = b""
    with sock:
        try:
            while data := sock.recv(1 << 16):
                *lines, rest = (rest + data).split(b"\n")
                for line in lines:
                    out.put((connection, line))
        except OSError:  # reset by the kill, or SILENCE passed (the loop then finds it alive)
            pass
    out.put((connection, None))


# -- the daemon's side --------------------------------------------------------------------------


class Supervisor:
    """Starts `edgeseq serve` on one state dir, kills it with SIGKILL when told to (from a
    thread, a moment later, so the kill lands at an instant the client does not choose),
    and starts it again."""

    def __init__(self, state_dir: Path) -> None:
        self.args = (
            str(DEFAULT_MODEL), "--listen", "tcp://127.0.0.1:0",
            "--state-dir", str(state_dir), "--checkpoint-interval", "20ms",
        )  # fmt: skip
        self.daemons: list[DaemonProcess] = []
        self.killed: set[int] = set()  # pids this supervisor killed
        self.killer: threading.Thread | None = None
        self.restart_seconds: list[float] = []

    @property
    def current(self) -> DaemonProcess:
        return self.daemons[-1]

    def start(self) -> int:
        """A new daemon, ready; its port."""
        begun = time.monotonic()
        daemon = DaemonProcess(*self.args)
        self.daemons.append(daemon)
        daemon.wait_for("ready", timeout=60)
        self.restart_seconds.append(time.monotonic() - begun)
        return daemon.tcp_port

    def kill_soon(self, delay: float) -> None:
        target = self.current

        def kill() -> None:
            time.sleep(delay)
            if target.proc.poll() is None:  # a daemon that died by itself stays unexplained
                self.killed.add(target.proc.pid)
                target.proc.send_signal(signal.SIGKILL)

        self.killer = threading.Thread(target=kill, daemon=True)
        self.killer.start()

    @property
    def may_kill(self) -> bool:
        """No kill on its way, and the current daemon not killed yet (its last answers may
        still be coming in)."""
        idle = self.killer is None or not self.killer.is_alive()
        return idle and self.current.proc.pid not in self.killed

    def restart(self) -> int:
        """After the connection ended: the daemon must have been killed by us; start anew."""
        daemon = self.current
        if self.killer is not None:
            self.killer.join(5)
        try:
            code = daemon.proc.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail("the daemon closed the connection but still runs (or was silent)")
        if daemon.proc.pid not in self.killed:
            pytest.fail(f"the daemon died by itself (exit {code}):\n" + stderr_tail(daemon))
        daemon.close()
        return self.start()

    def finish(self) -> None:
        """Stop the last daemon (exit 0), close every pipe; no daemon logged a traceback."""
        if self.killer is not None:
            self.killer.join(5)
        if self.current.proc.poll() is not None:  # the last kill landed after the last answer
            self.current.close()
            self.start()
        code = self.current.stop()
        for daemon in self.daemons:
            if daemon.proc.poll() is None:
                daemon.kill9()
            daemon.close()
        assert code == 0, stderr_tail(self.current)
        for daemon in self.daemons:
            assert not any("Traceback" in line for line in daemon.raw_stderr), stderr_tail(daemon)


def stderr_tail(daemon: DaemonProcess) -> str:
    return "\n".join(daemon.raw_stderr[-15:])


# -- the loop -----------------------------------------------------------------------------------


def fleet(seed: int, n_streams: int, mean_length: int) -> list[Stream]:
    """Streams of random lengths (mean_length/2 to 3*mean_length/2) and samples; FIRST begin
    at once, the others at random points before 3/4 of the run's samples are answered."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(mean_length // 2, mean_length * 3 // 2 + 1, n_streams)
    total = int(lengths.sum())
    later = np.sort(rng.uniform(0, 0.75 * total, n_streams - FIRST))
    begins = np.concatenate([np.zeros(FIRST), later])
    streams = []
    for k, length in enumerate(lengths):
        xs = rng.normal(0.0, 1.0, (int(length), 3)).astype(np.float32)
        streams.append(Stream(f"crash-{seed}-{k}", xs, offline(xs), int(begins[k])))
    return streams


def kill_points(rng: np.random.Generator, total: int, kills: int) -> list[float]:
    """Numbers of y answers at which to kill: one in each of `kills` equal slices of the first
    90 % of the run, so kills spread over it whatever the machine's speed."""
    width = 0.9 * total / kills
    return [(k + rng.uniform(0.2, 0.8)) * width for k in range(kills)]


def crash_loop(state_dir: Path, seed: int, n_streams: int, mean_length: int, kills: int,
               timeout: float) -> str:  # fmt: skip
    """Run the loop; fail on any problem; a one-line report."""
    streams = fleet(seed, n_streams, mean_length)
    rng = np.random.default_rng(seed + 1)
    points = kill_points(rng, sum(len(s.xs) for s in streams), kills)
    client, supervisor = ProtocolClient(streams, rng), Supervisor(state_dir)
    begun = time.monotonic()
    try:
        client.connect(supervisor.start())
        while not all(s.done for s in streams):
            elapsed = time.monotonic() - begun
            assert elapsed < timeout, f"[seed {seed}] not done: {unfinished(streams)}"
            begin_streams(streams, client.counts["y checked"])
            if points and client.counts["y checked"] >= points[0] and supervisor.may_kill:
                points.pop(0)
                supervisor.kill_soon(float(rng.uniform(0.0, 0.03)))
            client.pump()
            try:
                connection, raw = client.answers.get(timeout=SILENCE + 5)
            except queue.Empty:
                pytest.fail(f"[seed {seed}] no answer and no close for {SILENCE + 5:.0f} s")
            if connection != client.connection:
                continue  # the end of a connection already replaced
            if raw is None:
                client.lost()
                client.connect(supervisor.restart())
            else:
                client.take(raw)
            assert not client.problems, f"[seed {seed}]\n" + "\n".join(client.problems)
    finally:
        if client.sock is not None:
            client.sock.close()
        supervisor.finish()
    assert_the_run_proved_something(client, supervisor, kills)
    return report(client, supervisor, time.monotonic() - begun)


def begin_streams(streams: list[Stream], answers: int) -> None:
    """Streams whose time has come begin; if nothing at all is in flight, the next one does."""
    for s in streams:
        s.active = s.active or s.begins_at <= answers
    if not any(s.in_flight or (s.active and not s.done) for s in streams):
        waiting = [s for s in streams if not s.active]
        if waiting:
            waiting[0].active = True


def unfinished(streams: list[Stream]) -> list[str]:
    return [f"{s.sid} at {s.answered + 1}/{len(s.xs)}" for s in streams if not s.done][:10]


def assert_the_run_proved_something(
    client: ProtocolClient, supervisor: Supervisor, kills: int
) -> None:
    assert len(supervisor.killed) == kills, f"{len(supervisor.killed)} kills of {kills}"
    assert len(supervisor.daemons) >= kills + 1, "a restart did not come up"
    assert client.counts["resends honoured"] >= 1, "no restart asked for a resend"
    assert client.counts["durable"] >= 1, "no answer carried an integer durable"


def report(client: ProtocolClient, supervisor: Supervisor, seconds: float) -> str:
    counts, restarts = client.counts, supervisor.restart_seconds[1:]
    return (
        f"{len(supervisor.killed)} kills and {len(restarts)} restarts (to ready: median "
        f"{np.median(restarts):.2f} s, max {max(restarts):.2f} s) in {seconds:.1f} s; "
        f"{len(client.streams)} streams; {counts['y checked']} y checked "
        f"({counts['duplicates']} duplicates), {counts['resends honoured']} resends honoured, "
        f"{counts['stale']} stale, {counts['durable']} answers with durable"
    )


def test_kill_9_five_times_under_load_loses_nothing_and_applies_nothing_twice(
    tmp_path: Path,
) -> None:
    print("\n" + crash_loop(tmp_path / "state", 7, 30, 300, kills=5, timeout=60.0))


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_kill_9_a_hundred_times_under_load_loses_nothing_and_applies_nothing_twice(
    tmp_path: Path,
) -> None:
    print("\n" + crash_loop(tmp_path / "state", 11, 40, 1500, kills=100, timeout=1200.0))
