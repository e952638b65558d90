"""The daemon's knobs: defaults, a TOML file (`--config`), then command-line overrides.

Read once at start (and again on reload). A config file is untrusted input: unknown keys, wrong
types and out-of-range values are refused with the key, the file and what was expected.
Durations are seconds, or strings with a unit: "500ms", "30s", "10m", "1h".
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgeseq.errors import UsageError
from edgeseq.toml_input import read_toml

DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
UNIT_SECONDS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
LOG_LEVELS = ("debug", "info", "warning", "error")
DURATIONS = {
    "idle_timeout",
    "max_wait",
    "checkpoint_interval",
    "watch_interval",
    "nats_lease_ttl",
    "nats_checkpoint_interval",
    "nats_retention",
}
NATS_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # a JetStream stream or KV bucket name
SUBJECT_TOKEN = re.compile(r"^[^.*>\s]+$")
# One daemon's stream table: past this, its bookkeeping alone (ids, seq, answers: some 200 bytes
# a stream) outgrows a board and its checkpoint header the 64 MiB a snapshot may hold.
MAX_STREAMS = 1_000_000


@dataclass
class DaemonConfig:
    """Every setting of `edgeseq serve`; the field names are the TOML keys."""

    model: str = ""
    backend: str = "numba"
    format: str = "json"  # stdin: "json" lines or "csv" (id,seq,x1,...,xn)
    listen: str | None = None  # tcp://HOST:PORT
    mqtt: str | None = None  # mqtt://HOST:PORT
    mqtt_in: str = "edgeseq/+/in"  # "+" is the stream id
    mqtt_out: str = "edgeseq/{id}/out"
    mqtt_status: str = "edgeseq/status"
    mqtt_qos: int = 1
    mqtt_client_id: str = "edgeseq-serve"
    # NATS JetStream: streams partitioned over daemons (daemon/partitioned/, docs/cluster.md).
    # In a TOML file these are the keys of a [nats] table: servers, partitions, ...
    nats: str | None = None  # nats://HOST:PORT[,nats://HOST:PORT...]
    nats_in: str = "edgeseq.in.*"  # "*" is the stream id
    nats_out: str = "edgeseq.out.{id}"
    nats_stream: str = "EDGESEQ"  # the samples' stream; buckets EDGESEQ-leases, -checkpoints
    nats_partitions: int = 64
    nats_replicas: int = 3
    nats_retention: float = 86_400.0  # samples kept this long: replay reaches this far back
    nats_lease_ttl: float = 3.0  # a silent daemon's partitions move after this long
    nats_checkpoint_interval: float = 5.0  # bounds the replay after a takeover
    nats_name: str = ""  # this daemon in the cluster; default HOST-PID
    nats_answers: str = "plain"  # "stream": also stored, acknowledged, in <stream>-ANSWERS
    max_streams: int = 10_000
    idle_timeout: float = 600.0
    max_batch: int = 256
    max_wait: float = 0.001
    queue_size: int = 10_000
    max_line_bytes: int = 65_536
    state_dir: str | None = None
    checkpoint_interval: float = 30.0
    reset_on_model_change: bool = False
    watch: bool = False
    watch_interval: float = 1.0
    metrics: str | None = None  # HOST:PORT
    log_level: str = "info"
    log_format: str = "json"  # "json" lines or "text"

    def check(self) -> DaemonConfig:
        """Refuse values that cannot work, naming the setting."""
        _one_of("backend", self.backend, ("numba", "numpy", "onnxruntime"))
        _one_of("format", self.format, ("json", "csv"))
        _one_of("log_level", self.log_level, LOG_LEVELS)
        _one_of("log_format", self.log_format, ("json", "text"))
        _one_of("mqtt_qos", self.mqtt_qos, (0, 1))
        for name in ("max_streams", "max_batch", "queue_size", "max_line_bytes"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} is {getattr(self, name)}; expected an integer >= 1")
        if self.max_streams > MAX_STREAMS:
            raise UsageError(
                f"max_streams is {self.max_streams}; expected at most {MAX_STREAMS:,} (one "
                "daemon's stream table; run more daemons for more streams)"
            )
        for name in ("idle_timeout", "checkpoint_interval", "watch_interval"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} is {getattr(self, name)}; expected a duration > 0")
        if self.max_wait < 0:
            raise UsageError(f"max_wait is {self.max_wait}; expected a duration >= 0")
        if self.listen is not None:
            parse_address(self.listen, "listen", "tcp")
        if self.mqtt is not None:
            parse_address(self.mqtt, "mqtt", "mqtt")
        if self.metrics is not None:
            parse_address(self.metrics, "metrics", None)
        if self.nats is not None:
            self._check_nats()
        if self.mqtt_in.count("+") != 1 or "#" in self.mqtt_in:
            raise UsageError(
                f"mqtt_in is {self.mqtt_in!r}; expected a topic with one '+' for the stream id"
            )
        if "{id}" not in self.mqtt_out:
            raise UsageError(f"mqtt_out is {self.mqtt_out!r}; expected a topic containing {{id}}")
        if not self.model:
            raise UsageError("no model: give MODEL.onnx or `model` in the config file")
        return self

    def _check_nats(self) -> None:
        assert self.nats is not None
        nats_servers(self.nats)
        others = [name for name in ("listen", "mqtt", "state_dir") if getattr(self, name)]
        if others:
            raise UsageError(
                f"nats cannot be combined with {', '.join(others)}: with NATS, every sample comes "
                "through the cluster's partitions and states are checkpointed in JetStream"
            )
        for name, pattern in (("nats_stream", NATS_NAME), ("nats_name", NATS_NAME)):
            value = getattr(self, name)
            if value and not pattern.match(value):
                raise UsageError(f"{name} is {value!r}; expected 1-64 letters, digits, '_' or '-'")
        tokens = self.nats_in.split(".")
        if tokens.count("*") != 1 or not all(t == "*" or SUBJECT_TOKEN.match(t) for t in tokens):
            raise UsageError(
                f"nats_in is {self.nats_in!r}; expected a subject with one '*' token for the "
                "stream id, like edgeseq.in.*"
            )
        out = self.nats_out.replace("{id}", "x").split(".")
        if "{id}" not in self.nats_out or not all(SUBJECT_TOKEN.match(t) for t in out):
            raise UsageError(
                f"nats_out is {self.nats_out!r}; expected a subject with an {{id}} token, like "
                "edgeseq.out.{id}"
            )
        if not 1 <= self.nats_partitions <= 4096:
            raise UsageError(f"nats_partitions is {self.nats_partitions}; expected 1 to 4096")
        _one_of("nats_replicas", self.nats_replicas, (1, 3, 5))
        _one_of("nats_answers", self.nats_answers, ("plain", "stream"))
        for name in ("nats_retention", "nats_lease_ttl", "nats_checkpoint_interval"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} is {getattr(self, name)}; expected a duration > 0")


def nats_servers(text: str) -> list[str]:
    """ "nats://H:P,nats://H:P" -> the URLs, each checked (a port is required)."""
    urls = [part.strip() for part in text.split(",") if part.strip()]
    if not urls:
        raise UsageError(f"nats is {text!r}; expected nats://HOST:PORT[,nats://HOST:PORT...]")
    for url in urls:
        parse_address(url, "nats", "nats")
    return urls


DEFAULT_PORTS = {"mqtt": 1883, "nats": 4222}
LOOPBACK = "127.0.0.1"  # what a daemon binds unless told otherwise


def parse_address(text: str, what: str, scheme: str | None) -> tuple[str, int]:
    """ "tcp://HOST:PORT" (or "HOST:PORT" where no scheme is needed) -> (host, port). An empty
    host is 127.0.0.1; mqtt:// without a port is 1883."""
    url = urlsplit(text if "://" in text else f"//{text}")
    if scheme is not None and url.scheme != scheme:
        raise UsageError(f"{what} is {text!r}; expected {scheme}://HOST:PORT")
    try:
        port = url.port if url.port is not None else DEFAULT_PORTS.get(scheme or "")
    except ValueError:
        port = None
    if port is None or url.path or url.query:
        raise UsageError(f"{what} is {text!r}; expected {scheme or ''}{'://' if scheme else ''}"
                         "HOST:PORT with a port number")  # fmt: skip
    return url.hostname or LOOPBACK, port


def parse_duration(value: Any, name: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    match = DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise UsageError(
            f"{name} is {value!r}; expected seconds or a duration like 500ms, 30s, 10m, 1h"
        )
    return float(match.group(1)) * UNIT_SECONDS[match.group(2)]


def _one_of(name: str, value: object, allowed: tuple[object, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"{name} is {value!r}; expected one of {', '.join(map(repr, allowed))}")


def _coerce(name: str, value: Any, kind: str, where: str) -> Any:
    if name in DURATIONS:
        return parse_duration(value, f"{name} ({where})")
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "str | None": isinstance(value, str),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
    }.get(kind, False)
    if not ok:
        expected = kind.replace(" | None", "")
        raise UsageError(f"{name} is {value!r} in {where}; expected a {expected}")
    return float(value) if kind == "float" else value


def _flattened(table: dict[str, Any], path: Path) -> dict[str, Any]:
    """A [nats] table's keys as nats_<key> settings (`servers` is `nats`); the rest as is."""
    flat = {k: v for k, v in table.items() if k != "nats" or not isinstance(v, dict)}
    section = table.get("nats")
    if isinstance(section, dict):
        for key, value in section.items():
            if isinstance(value, dict):
                raise UsageError(f"[nats.{key}] in {path}: expected a setting, not a table")
            flat["nats" if key == "servers" else f"nats_{key.replace('-', '_')}"] = value
    return flat


def build_config(path: Path | None, overrides: dict[str, Any]) -> DaemonConfig:
    """Defaults, then the TOML file, then `overrides` (None means "not given")."""
    fields = {f.name: str(f.type) for f in dataclasses.fields(DaemonConfig)}
    values: dict[str, Any] = {}
    if path is not None:
        table = read_toml(path, "config")
        for key, value in _flattened(table, path).items():
            name = key.replace("-", "_")
            if name not in fields:
                raise UsageError(
                    f"unknown setting {key!r} in {path}; known: {', '.join(sorted(fields))}"
                )
            values[name] = _coerce(name, value, fields[name], str(path))
    for name, value in overrides.items():
        if value is not None:
            values[name] = _coerce(name, value, fields[name], "the command line")
    return DaemonConfig(**values).check()
