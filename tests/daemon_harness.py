"""Run `edgeseq serve` as a real subprocess and talk to it: the daemon tests' shared harness.

The daemon logs JSON lines on stderr; a thread collects them, so a test can wait for an event
("ready", "listening", "metrics", "states restored", ...) and read its fields (the TCP port the
daemon bound when given port 0, say).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "export" / "pump-lstm.onnx"


class DaemonProcess:
    """`edgeseq serve ARGS` in a subprocess; stdout is a pipe (answers in stdin mode)."""

    def __init__(
        self, *args: str, stdin: Any = subprocess.DEVNULL, env: dict[str, str] | None = None,
        argv: list[str] | None = None, cwd: Path = ROOT,
    ) -> None:  # fmt: skip
        """`argv` replaces the whole command (the README's commands, run as written)."""
        cmd = argv or [sys.executable, "-m", "edgeseq", "serve", *args, "--log-format", "json"]
        self.proc = subprocess.Popen(
            cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})}, cwd=cwd,
        )  # fmt: skip
        self.logs: list[dict[str, Any]] = []
        self.raw_stderr: list[str] = []
        self._lock = threading.Lock()
        self._collector = threading.Thread(target=self._collect, daemon=True)
        self._collector.start()

    def _collect(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._lock:
                self.raw_stderr.append(line)
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict):
                    self.logs.append(entry)

    def wait_for(self, event: str, timeout: float = 60.0, after: int = 0) -> dict[str, Any]:
        """The first log entry (from index `after`) whose event is `event`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for entry in self.logs[after:]:
                    if entry.get("event") == event:
                        return entry
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the collector read the last lines
                with self._lock:
                    for entry in self.logs[after:]:
                        if entry.get("event") == event:
                            return entry
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode}) before {event!r}:\n"
                    + "\n".join(self.raw_stderr[-20:])
                )
            time.sleep(0.02)
        raise AssertionError(
            f"no {event!r} within {timeout}s:\n" + "\n".join(self.raw_stderr[-20:])
        )

    @property
    def tcp_port(self) -> int:
        return int(self.wait_for("listening")["port"])

    @property
    def metrics_port(self) -> int:
        return int(self.wait_for("metrics")["port"])

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.close()

    def close(self) -> None:
        """Close our ends of the pipes (the collector thread ends with stderr)."""
        for pipe in (self.proc.stdout, self.proc.stdin):
            if pipe is not None:
                pipe.close()
        if self.proc.stderr is not None:
            self._collector.join(10)  # the daemon has exited: its stderr ends
            if not self._collector.is_alive():
                self.proc.stderr.close()


def release(d: DaemonProcess) -> None:
    """Kill the daemon if it still runs and close the harness's pipes (an unclosed pipe is a
    ResourceWarning, an error under this pytest setup)."""
    if d.proc.poll() is None:
        d.kill9()
    d.close()


def assert_no_traceback(d: DaemonProcess) -> None:
    text = "\n".join(d.raw_stderr)
    assert "Traceback" not in text, text[-3000:]


class LineClient:
    """A blocking JSON-lines TCP client."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rwb")

    def send(self, message: dict[str, Any] | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.file.write(data.rstrip(b"\n") + b"\n")

    def flush(self) -> None:
        self.file.flush()

    def receive(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise ConnectionError("the daemon closed the connection")
        return json.loads(line)

    def ask(self, message: dict[str, Any] | bytes) -> dict[str, Any]:
        self.send(message)
        self.flush()
        return self.receive()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def offline_predictions(model_path: Path, xs: np.ndarray) -> np.ndarray:
    """What Stream.feed gives for one stream's samples (T, F) -> (T, n_out)."""
    import edgeseq

    return edgeseq.load(model_path).stream().feed(np.asarray(xs, np.float32))
