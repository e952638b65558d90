"""`edgeseq loadtest`: every workload in turn, each against fresh child processes.

In order: the runtime's own pool rate (a process of its own); the generator ceiling (the many-
stream TCP load against the null server); the daemon over TCP (one stream, then many, then the
memory soak, on one daemon); stdin; MQTT. Nothing runs beside a measurement but what it measures.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgeseq.bench.loadgen.children import Child, start_daemon, start_null_server, tcp_port
from edgeseq.bench.loadgen.figures import Figures, Memory, MqttRun, Throughput
from edgeseq.bench.loadgen.mqtt_workload import SAMPLES, mqtt_runs
from edgeseq.bench.loadgen.neighbours import llvm_neighbours
from edgeseq.bench.loadgen.poolrate import measure_in_child
from edgeseq.bench.loadgen.stdio_workload import pipeline
from edgeseq.bench.loadgen.tcp_workload import many_streams, one_stream
from edgeseq.bench.loadgen.wire_lines import n_features
from edgeseq.errors import UsageError

Say = Callable[[str], None]
WARM_UP = 60.0  # seconds of soak before the first memory reading (a fifth of shorter soaks)
READINGS = 30  # memory readings over a soak, about


@dataclass(frozen=True)
class Options:
    streams: int = 1000
    connections: int = 4
    seconds: float = 10.0  # of each many-stream throughput run
    soak: float = 600.0  # of the memory soak (0: none)
    solo: float = 5.0  # of the one-stream closed loop
    stdin_lines: int = 200_000
    mqtt: bool = True
    mqtt_samples: int = SAMPLES  # per stream, 20 streams
    pool_seconds: float = 3.0

    def check(self) -> Options:
        for name in ("streams", "connections", "stdin_lines", "mqtt_samples"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, found {getattr(self, name)!r}")
        for name in ("seconds", "solo", "pool_seconds"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name} must be positive, found {getattr(self, name)!r}")
        if self.soak < 0:
            raise UsageError(f"soak must be 0 (none) or positive, found {self.soak!r}")
        return self

    def command(self, model: Path) -> str:
        """The `edgeseq loadtest` command line that runs with these options."""
        flags = {"--streams": self.streams, "--connections": self.connections,
                 "--seconds": self.seconds, "--soak": self.soak, "--solo": self.solo,
                 "--stdin-lines": self.stdin_lines}  # fmt: skip
        words = ["edgeseq", "loadtest", str(model)]
        for flag, value in flags.items():
            words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
        return shlex.join([*words, "--mqtt" if self.mqtt else "--no-mqtt"])


def _quiet(text: str) -> None:
    pass


def run(model: Path, options: Options, say: Say = _quiet, note: Say = _quiet) -> Figures:
    """Measure every workload; `say` gets what is running now, `note` each finished figure."""
    if not model.is_file():
        raise UsageError(f"{model}: no such model file")
    return _Run(model, options.check(), say, note).figures()


class _Run:
    def __init__(self, model: Path, options: Options, say: Say, note: Say) -> None:
        self.model, self.o, self.say, self.note = model, options, say, note
        self.features = n_features(model)

    def figures(self) -> Figures:
        o = self.o
        pool_rate = self.pool_rate()
        ceiling, solo_ceiling = self.ceiling()
        solo, many, memory = self.tcp()
        stdin, stdin_exit = self.stdin()
        mqtt = self.mqtt() if o.mqtt else []
        return Figures(
            model=str(self.model), streams=o.streams, connections=o.connections,
            command=o.command(self.model), cores=os.cpu_count() or 0, ceiling=ceiling,
            many=many, solo=solo, solo_ceiling=solo_ceiling, pool_rate=pool_rate,
            stdin=stdin, stdin_exit=stdin_exit, mqtt=mqtt, memory=memory,
        )  # fmt: skip

    def pool_rate(self) -> float:
        streams = self.o.streams
        self.say(f"the runtime's own pool rate, {streams:,} streams, in its own process")
        rate = measure_in_child(self.model, streams, self.o.pool_seconds)
        self.note(f"runtime model.pool({streams:,}).step: {rate:,.0f} samples/s")
        return rate

    def ceiling(self) -> tuple[Throughput, Throughput]:
        """The many-stream load and the closed loop against the null server."""
        with start_null_server() as null:
            port = tcp_port(null)
            ceiling = self._many(port, "null server (generator ceiling)", self.o.seconds)
            solo = one_stream(port, self.features, min(self.o.solo, 2.0))
        self.note(f"generator ceiling (null server): {ceiling.rate:,.0f} samples/s")
        return ceiling, solo

    def tcp(self) -> tuple[Throughput, Throughput, Memory | None]:
        """One daemon over TCP: its memory at ready, one stream, many streams, then the soak."""
        o = self.o
        self.say("starting edgeseq serve --listen tcp://127.0.0.1:0")
        options = ["--listen", "tcp://127.0.0.1:0", "--max-streams", str(o.streams + 16)]
        with start_daemon(self.model, *options) as daemon:
            port = tcp_port(daemon)
            at_ready = daemon.rss_mib()
            self.say(f"edgeseq serve: 1 stream, closed loop, {o.solo:g} s")
            solo = one_stream(port, self.features, o.solo)
            self.note(f"edgeseq serve, 1 stream: p50 {solo.p50_us or 0:,.0f} us")
            many = self._many(port, f"edgeseq serve: {o.streams:,} streams", o.seconds)
            self.note(f"edgeseq serve, {o.streams:,} streams: {many.rate:,.0f} samples/s, "
                      f"{many.lost:,} lost, {many.errors:,} errors")  # fmt: skip
            memory = self._soak(daemon, port, at_ready) if o.soak > 0 else None
        return solo, many, memory

    def _many(self, port: int, label: str, seconds: float,
              also: Callable[[float], None] | None = None) -> Throughput:  # fmt: skip
        def show(elapsed: float, answers: int) -> None:
            if also is not None:
                also(elapsed)
            rate = answers / elapsed if elapsed > 0 else 0.0
            self.say(f"{label}: {min(elapsed, seconds):.0f}/{seconds:g} s, {rate:,.0f} samples/s")

        o = self.o
        return many_streams(port, self.features, o.streams, o.connections, seconds, show)

    def _soak(self, daemon: Child, port: int, at_ready: float) -> Memory:
        """The many-stream load for `soak` s, the daemon's resident memory read as it runs."""
        soak = self.o.soak
        readings: list[tuple[float, float]] = []
        next_at = [min(WARM_UP, soak / 5)]

        def read_memory(elapsed: float) -> None:
            if next_at[0] <= elapsed < soak:
                readings.append((elapsed, daemon.rss_mib()))
                next_at[0] += max(soak / READINGS, 1.0)

        before = llvm_neighbours({daemon.proc.pid})
        load = self._many(port, f"memory soak, {self.o.streams:,} streams", soak, read_memory)
        readings.append((soak, daemon.rss_mib()))
        neighbours = set(before) | set(llvm_neighbours({daemon.proc.pid}))
        return Memory(at_ready, readings, load, len(neighbours))

    def stdin(self) -> tuple[Throughput, int]:
        self.say(f"stdin: {self.o.stdin_lines:,} lines through edgeseq serve")
        figure, code = pipeline(self.model, self.features, self.o.stdin_lines, self.o.streams)
        self.note(f"stdin: {figure.rate:,.0f} samples/s, {figure.lost:,} lost, exit {code}")
        return figure, code

    def mqtt(self) -> list[MqttRun]:
        runs = mqtt_runs(self.model, self.features, count=self.o.mqtt_samples, say=self.say)
        for r in runs:
            rates = f"broker only {r.broker_only.rate:,.0f}, via the daemon {r.daemon.rate:,.0f}"
            self.note(
                f"MQTT QoS {r.qos}: {rates} samples/s ({r.share:.2f}x), {r.daemon.lost:,} lost"
            )
        return runs
