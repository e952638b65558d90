"""A load test for `edgeseq serve`: the daemon in one process, this client in another, loopback TCP.

Two workloads, as a fleet would send them:
- one stream, closed loop: send a sample, wait for its answer, repeat (latency floor);
- many streams (1,000 by default), each tick one sample per stream, a few ticks in flight
  (sustained throughput, and the latency a sample sees under that load).
While the many-stream load runs for `soak` seconds, the daemon's resident memory is sampled;
it must stay flat (the last reading within 5% of the reading after warm-up).
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeseq.errors import EdgeseqError
from edgeseq.resident import resident_mib

IN_FLIGHT_TICKS = 4


@dataclass
class LoadResult:
    streams: int
    samples: int
    seconds: float
    latencies: np.ndarray  # seconds, one per sample

    @property
    def rate(self) -> float:
        return self.samples / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1e6


@dataclass
class LoadReport:
    model: str
    one: LoadResult
    many: LoadResult
    rss_mib: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MiB)
    rss_at_ready: float = 0.0

    @property
    def rss_drift(self) -> float:
        """Last reading over the first one after warm-up, minus 1."""
        first, last = self.rss_mib[0][1], self.rss_mib[-1][1]
        return last / first - 1.0


class ServedDaemon:
    """`edgeseq serve MODEL --listen tcp://127.0.0.1:0` as a child process."""

    def __init__(self, model: Path, capacity: int) -> None:
        listen, streams = "tcp://127.0.0.1:0", str(capacity)
        cmd = [sys.executable, "-m", "edgeseq", "serve", str(model), "--listen", listen,
               "--max-streams", streams, "--log-level", "info"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.port = self._wait_for_port()

    def _wait_for_port(self) -> int:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            entry = json.loads(raw) if raw.startswith(b"{") else {}
            if entry.get("event") == "listening":
                threading.Thread(target=self._drain, daemon=True).start()
                return int(entry["port"])
        raise EdgeseqError(f"the daemon exited ({self.proc.wait()}) before listening")

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for _ in self.proc.stderr:
            pass

    def rss_mib(self) -> float:
        found = resident_mib(self.proc.pid)
        return float("nan") if found is None else found

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _line(sid: str, seq: int, x: list[float]) -> bytes:
    return json.dumps({"id": sid, "seq": seq, "x": x}, separators=(",", ":")).encode() + b"\n"


def one_stream(port: int, n_features: int, seconds: float) -> LoadResult:
    """Closed loop on one connection: the latency of a single sample, end to end."""
    rng = np.random.default_rng(0)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        latencies, seq, start = [], 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            line = _line("solo", seq, rng.normal(size=n_features).round(4).tolist())
            sent = time.perf_counter()
            sock.sendall(line)
            reader.readline()
            latencies.append(time.perf_counter() - sent)
            seq += 1
        elapsed = time.perf_counter() - start
    return LoadResult(1, seq, elapsed, np.array(latencies))


def many_streams(port: int, n_features: int, streams: int, seconds: float,
                 on_tick: Callable[[float], None] | None = None) -> LoadResult:  # fmt: skip
    """Ticks of one sample per stream, IN_FLIGHT_TICKS ahead of the answers; a reader thread
    times each answer against the moment its tick was sent."""
    ids = [f"sensor-{i:05d}" for i in range(streams)]
    xs = np.random.default_rng(1).normal(size=(64, streams, n_features)).round(4)
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    answered = threading.Semaphore(IN_FLIGHT_TICKS)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        reader = sock.makefile("rb")
        stop = threading.Event()

        def read() -> None:
            for count, raw in enumerate(reader, start=1):
                at = raw.index(b'"seq":') + 6
                seq = int(raw[at : raw.index(b",", at)])
                latencies.append(time.perf_counter() - sent_at[seq])
                if count % streams == 0:
                    answered.release()
                if stop.is_set() and count == len(sent_at) * streams:
                    return

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        tick, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            answered.acquire()
            block = b"".join(_line(ids[i], tick, xs[tick % 64, i].tolist()) for i in range(streams))
            sent_at[tick] = time.perf_counter()
            sock.sendall(block)
            tick += 1
            if on_tick is not None:
                on_tick(time.perf_counter() - start)
        stop.set()
        thread.join(60)
        elapsed = time.perf_counter() - start
    return LoadResult(streams, tick * streams, elapsed, np.array(latencies))


def run_load(model: Path, streams: int, soak: float, solo: float = 10.0) -> LoadReport:
    """Start a daemon, measure one stream, then `streams` streams for `soak` seconds."""
    n_features = _n_features(model)
    daemon = ServedDaemon(model, capacity=max(streams, 1) + 16)
    try:
        rss_at_ready = daemon.rss_mib()
        one = one_stream(daemon.port, n_features, solo)
        readings: list[tuple[float, float]] = []
        warm_up = min(60.0, soak / 5)
        next_reading = [warm_up]

        def sample_rss(elapsed: float) -> None:
            if elapsed >= next_reading[0]:
                readings.append((elapsed, daemon.rss_mib()))
                next_reading[0] += max(soak / 30, 1.0)

        many = many_streams(daemon.port, n_features, streams, soak, sample_rss)
        readings.append((soak, daemon.rss_mib()))
    finally:
        daemon.stop()
    return LoadReport(str(model), one, many, readings, rss_at_ready)


def _n_features(model: Path) -> int:
    """From the graph's input, without loading the runtime here: this process must not map
    Numba's LLVM too, or the daemon's pages would be shared and its memory misread."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value)


def markdown(report: LoadReport) -> str:
    rows = [
        f"| {r.streams:,} | {r.rate:,.0f} | {r.percentile(50):,.0f} | {r.percentile(99):,.0f} |"
        for r in (report.one, report.many)
    ]
    first, last = report.rss_mib[0], report.rss_mib[-1]
    return "\n".join(
        [
            LOAD_HEADING,
            "",
            f"`edgeseq loadtest {report.model}`: the daemon and this load generator are separate "
            "processes on one machine, over loopback TCP (JSON lines); latency is from writing a "
            "sample to reading its answer.",
            "",
            "| streams | samples/s sustained | p50 latency us | p99 latency us |",
            "|---:|---:|---:|---:|",
            *rows,
            "",
            f"Resident memory: {report.rss_at_ready:.0f} MiB when ready; {first[1]:.0f} MiB after "
            f"{first[0]:.0f} s of load, {last[1]:.0f} MiB after {last[0]:.0f} s "
            f"({report.rss_drift:+.1%}; flat means within 5%: "
            f"{'yes' if abs(report.rss_drift) <= 0.05 else '**no**'}).",
            "",
        ]
    )


LOAD_HEADING = "## edgeseq serve under load"


def keep_load_section(path: Path, report: str) -> str:
    """`report` followed by the load section already in `path` (if any): `edgeseq bench`
    rewrites the speed report without losing the figures `edgeseq loadtest` wrote."""
    text = path.read_text() if path.exists() else ""
    if LOAD_HEADING not in text:
        return report
    return report.rstrip() + "\n\n" + LOAD_HEADING + text.split(LOAD_HEADING, 1)[1]


def write_section(path: Path, section: str) -> None:
    """Replace (or append) the load section of BENCHMARKS.md, leaving the rest as it is."""
    text = path.read_text() if path.exists() else ""
    head = text.split(LOAD_HEADING)[0].rstrip()
    path.write_text((head + "\n\n" if head else "") + section)


if __name__ == "__main__":  # pragma: no cover - `edgeseq loadtest` is the entry point
    print(markdown(run_load(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))))
    os._exit(0)
