"""What one `edgeseq loadtest` run measured: plain figures, judged and written by report.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Throughput:
    """One workload: samples answered over the seconds from first write to last answer."""

    samples: int
    seconds: float
    p50_us: float | None = None
    p99_us: float | None = None
    errors: int = 0  # error answers
    lost: int = 0  # samples sent that were never answered
    duplicates: int = 0  # answers received twice (MQTT QoS 1 may redeliver)
    first_error: str | None = None  # an excerpt of the first error answer
    generator_cpu: float | None = None  # CPUs the load generator's own process kept busy

    @property
    def rate(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def clean(self) -> bool:
        return self.errors == 0 and self.lost == 0


def latency_us(seconds: Sequence[float] | np.ndarray) -> tuple[float | None, float | None]:
    """p50 and p99 in microseconds (None, None without any)."""
    if len(seconds) == 0:
        return None, None
    p50, p99 = np.percentile(np.asarray(seconds, dtype=np.float64), [50, 99]) * 1e6
    return float(p50), float(p99)


@dataclass(frozen=True)
class MqttRun:
    """One QoS through a broker: the pub clients straight to the consumer, then via the daemon."""

    qos: int
    broker_only: Throughput
    daemon: Throughput

    @property
    def share(self) -> float:
        return self.daemon.rate / self.broker_only.rate if self.broker_only.rate > 0 else 0.0


@dataclass(frozen=True)
class Memory:
    """The daemon's resident memory in MiB: at ready, then (seconds of soak, MiB) readings from
    the end of the warm-up on; `load` is the soak's own many-stream figure."""

    at_ready: float
    readings: list[tuple[float, float]]
    load: Throughput
    neighbours: int = 0  # other processes mapping Numba's LLVM meanwhile (neighbours.py)

    @property
    def after_warm_up(self) -> tuple[float, float]:
        return self.readings[0]

    @property
    def at_end(self) -> tuple[float, float]:
        return self.readings[-1]

    @property
    def peak(self) -> float:
        return max([self.at_ready, *(mib for _, mib in self.readings)])

    @property
    def drift(self) -> float:
        """The last reading over the first one after warm-up, minus 1."""
        return self.at_end[1] / self.after_warm_up[1] - 1.0


@dataclass
class Figures:
    """Every figure of a run; the optional ones are None (or empty) when not measured."""

    model: str
    streams: int
    connections: int
    command: str  # the `edgeseq loadtest ...` that measured them
    cores: int  # CPUs of the machine, shared by the daemon and the load generator
    ceiling: Throughput  # the many-stream load against the null server
    many: Throughput  # the same load against the daemon
    solo: Throughput  # one stream, closed loop, against the daemon
    solo_ceiling: Throughput | None = None  # the closed loop against the null server
    pool_rate: float | None = None  # the runtime's own model.pool(streams).step samples/s
    stdin: Throughput | None = None
    stdin_exit: int | None = None
    mqtt: list[MqttRun] = field(default_factory=list)
    memory: Memory | None = None

    @property
    def ceiling_ratio(self) -> float:
        return self.ceiling.rate / self.many.rate if self.many.rate > 0 else float("inf")

    def mqtt_run(self, qos: int) -> MqttRun | None:
        return next((run for run in self.mqtt if run.qos == qos), None)
