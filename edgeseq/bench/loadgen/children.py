"""The processes a load test starts: each one's stderr read by a thread of its own, waited for by
its JSON log events ("listening", "ready"), and always stopped, SIGTERM then SIGKILL, by its own
Popen (never by name). The daemon runs as a user runs it: `python -m edgeseq serve MODEL ...`.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

from edgeseq.daemon.resident import resident_mib
from edgeseq.errors import EdgeseqError

READY_TIMEOUT = 300.0  # seconds a child may take to log "ready" (a cold Numba cache compiles)
STOP_TIMEOUT = 30.0  # seconds a child may take to exit after SIGTERM
KEPT_LINES = 40  # stderr lines kept to explain a failure
KEPT_EVENTS = 1000


class Child:
    """A child process whose JSON log lines on stderr are collected as events."""

    def __init__(
        self,
        cmd: list[str],
        name: str,
        stdin: int | IO[Any] | None = None,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
    ) -> None:
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
        self._events: deque[dict[str, Any]] = deque(maxlen=KEPT_EVENTS)
        self._lines: deque[str] = deque(maxlen=KEPT_LINES)
        self._closed = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(
            target=self._read_stderr, name=f"{name} stderr", daemon=True
        )
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:  # ends when the child closes its stderr
            event = _event(raw)
            with self._changed:
                self._lines.append(raw.decode("utf-8", "replace").rstrip())
                if event is not None:
                    self._events.append(event)
                self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def wait_for(self, event: str, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        """The first log entry `{"event": event, ...}`; raises if the child exits or is slow."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((e for e in self._events if e.get("event") == event), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    break
                self._changed.wait(min(left, 1.0))
        why = f"exited ({self.proc.poll()})" if self._closed else f"was silent for {timeout:.0f} s"
        raise EdgeseqError(f"{self.name} {why} before logging {event!r}:\n{self.stderr_tail()}")

    def stderr_tail(self) -> str:
        with self._changed:
            return "\n".join(self._lines)

    def rss_mib(self) -> float:
        """Resident memory in MiB (NaN once the child is gone)."""
        found = resident_mib(self.proc.pid)
        return float("nan") if found is None else found

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then SIGKILL after `timeout` s; the exit code."""
        code = end(self.proc, timeout)
        self._reader.join(timeout)
        close_pipes(self.proc)
        return code

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def end(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int:
    """Stop one child: SIGTERM, then SIGKILL after `timeout` s; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(10)


def close_pipes(proc: subprocess.Popen[bytes]) -> None:
    """Close our ends of a finished child's pipes."""
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError, ValueError):
                pipe.close()


def _event(raw: bytes) -> dict[str, Any] | None:
    if not raw.startswith(b"{"):
        return None
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def start_daemon(
    model: Path, *options: str, stdin: int | None = None, stdout: int | None = subprocess.DEVNULL
) -> Child:
    """`edgeseq serve MODEL *options` logging JSON at level info (wait_for("ready") next)."""
    cmd = [
        sys.executable,
        "-m",
        "edgeseq",
        "serve",
        str(model),
        *options,
        "--log-format",
        "json",
        "--log-level",
        "info",
    ]
    return Child(cmd, "edgeseq serve", stdin=stdin, stdout=stdout)


def start_null_server() -> Child:
    """The null server (nullserver.py) on a free port of 127.0.0.1."""
    return Child([sys.executable, "-m", "edgeseq.bench.loadgen.nullserver"], "the null server")


def tcp_port(child: Child) -> int:
    """The port of a child that logs `{"event": "listening", "port": ...}`, once it is ready."""
    port = int(child.wait_for("listening")["port"])
    child.wait_for("ready")
    return port
