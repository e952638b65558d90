"""Backpressure: a client that sends without reading its answers is slowed down by TCP itself.
The daemon stops reading from a connection whose answers are not being read (its requests wait
in the kernel's receive queue, where TCP flow control takes over), its memory stays bounded, and
once the client reads, every answer arrives, correct."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import numpy as np

from tests.daemon_harness import DEFAULT_MODEL, DaemonProcess, offline_predictions

SAMPLES = 250_000  # ~11 MB of requests and ~10 MB of answers: beyond every buffer on the way


def _unread_bytes(daemon_port: int, client_port: int) -> int:
    """The daemon-side socket's receive queue: bytes the kernel holds that it has not read."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1].split(":")[1], fields[2].split(":")[1]
        if int(local, 16) == daemon_port and int(remote, 16) == client_port:
            return int(fields[4].split(":")[1], 16)
    raise AssertionError("the daemon's socket is not in /proc/net/tcp")


def _expect_stalled(sent: list[int], timeout: float = 60.0) -> None:
    """Wait until the producer is blocked: nothing more sent for 2 s, far from done. TCP can
    only block it if the daemon stopped reading (requests pile up in the kernel's queues)."""
    deadline, history = time.monotonic() + timeout, [-1, -2, -3]
    while time.monotonic() < deadline:
        history = [*history[1:], sent[0]]
        if len(set(history)) == 1 and history[0] < SAMPLES:
            return
        time.sleep(1.0)
    raise AssertionError(f"the producer never blocked: {sent[0]} of {SAMPLES} sent")


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def test_a_client_that_does_not_read_is_slowed_down_and_the_daemon_stays_bounded():
    xs = np.random.default_rng(7).normal(size=(SAMPLES, 3)).round(3).astype(np.float32)
    lines = [json.dumps({"id": "greedy", "seq": i, "x": xs[i].tolist()}).encode() + b"\n"
             for i in range(SAMPLES)]  # fmt: skip
    with DaemonProcess(str(DEFAULT_MODEL), "--listen", "tcp://127.0.0.1:0") as daemon:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # before connect
        sock.connect(("127.0.0.1", daemon.tcp_port))
        sent, failed = [0], []

        def produce() -> None:
            try:
                for line in lines:
                    sock.sendall(line)
                    sent[0] += 1
            except OSError as exc:  # the daemon cut us off: say so, not "stalled"
                failed.append(exc)

        producer = threading.Thread(target=produce, daemon=True)
        base = _rss_mib(daemon.proc.pid)
        producer.start()
        try:
            _expect_stalled(sent)
            assert not failed, f"the daemon closed the connection after {sent[0]}: {failed[0]!r}"
            unread = _unread_bytes(daemon.tcp_port, sock.getsockname()[1])
            assert unread > 0, (
                f"the producer blocked after {sent[0]} lines while the daemon had read everything"
                "; its log ends:\n" + "\n".join(daemon.raw_stderr[-10:])
            )
            assert _rss_mib(daemon.proc.pid) - base < 60, "unread answers piled up in the daemon"
            with sock.makefile("rb") as reader:
                ys = []
                for _ in range(SAMPLES):  # now read: everything flows again
                    answer = json.loads(reader.readline())
                    assert answer["seq"] == len(ys), answer
                    ys.append(answer["y"])
            producer.join(30)
        finally:
            sock.close()
        assert daemon.stop() == 0
    np.testing.assert_allclose(
        np.array(ys), offline_predictions(DEFAULT_MODEL, xs), rtol=0, atol=1e-6
    )
