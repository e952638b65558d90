"""Board profiles (`devices/*.toml`) and the fit check: will this model run well on that board?

A profile names the board's architecture and CPU (as Numba/LLVM and QEMU spell it), its cores and
memory, the OS and Python it targets, a conservative compute figure, and daemon defaults chosen
for it (threads, batch size, a checkpoint interval that spares the SD card, a memory limit).
Profiles are untrusted files like any other input: every key is checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeseq import config
from edgeseq.errors import UsageError
from edgeseq.toml_input import read_toml

ROOT = Path(__file__).resolve().parents[2]  # the checkout
ARCHES = ("aarch64", "x86_64", "armv7l")
DAEMON_KEYS = {"threads", "max_streams", "max_batch", "max_wait", "checkpoint_interval",
               "idle_timeout", "memory_limit_mb"}  # fmt: skip
# The daemon's resident memory with numpy, numba (LLVM) and onnx loaded and LLVM's pages released,
# measured on x86-64 (about 120 MiB); ARM wheels are of the same size.
BASE_RSS_MB = 130.0
PER_STREAM_OVERHEAD_BYTES = 700  # the table's bookkeeping: dict entries, seq, last answer


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    arch: str
    numba_cpu: str
    qemu_cpu: str
    cores: int
    memory_mb: int
    os: str
    python: str
    macs_per_second: float
    overhead_us: float
    daemon: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def devices_dir() -> Path:
    """`devices/` of this checkout, or $EDGESEQ_DEVICES_DIR (config)."""
    return config.ENV.devices_dir or ROOT / "devices"


def _expect(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    value = table.get(key)
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if not ok:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise UsageError(f"{where}: {key!r} is {value!r}; expected a {names}")
    return value


def read_profile(path: Path) -> Profile:
    table = read_toml(path, "device profile")
    text = {k: _expect(table, k, str, path) for k in
            ("name", "description", "arch", "numba_cpu", "qemu_cpu", "os", "python")}  # fmt: skip
    if text["arch"] not in ARCHES:
        raise UsageError(f"{path}: arch is {text['arch']!r}; expected one of {ARCHES}")
    daemon = _expect(table, "daemon", dict, path)
    unknown = set(daemon) - DAEMON_KEYS
    if unknown:
        raise UsageError(
            f"{path}: unknown [daemon] keys {sorted(unknown)}; known {sorted(DAEMON_KEYS)}"
        )
    numbers = {k: _expect(table, k, (int, float), path)
               for k in ("macs_per_second", "overhead_us")}  # fmt: skip
    counts = {k: _expect(table, k, int, path) for k in ("cores", "memory_mb")}
    if min(*numbers.values(), *counts.values()) <= 0:
        raise UsageError(f"{path}: cores, memory_mb, macs_per_second, overhead_us must be > 0")
    return Profile(**text, **counts, macs_per_second=float(numbers["macs_per_second"]),
                   overhead_us=float(numbers["overhead_us"]), daemon=daemon, path=path)  # fmt: skip


def list_profiles() -> list[Profile]:
    folder = devices_dir()
    profiles = [read_profile(p) for p in sorted(folder.glob("*.toml")) if p.name != "serve.toml"]
    if not profiles:
        raise UsageError(f"no device profiles in {folder}")
    return profiles


def get_profile(name: str) -> Profile:
    profiles = {p.name: p for p in list_profiles()}
    if name not in profiles:
        raise UsageError(f"no device profile {name!r}; known: {', '.join(sorted(profiles))}")
    return profiles[name]


@dataclass
class Fit:
    """What the model costs on the board, and the warnings when it does not fit."""

    macs_per_sample: int
    state_floats: int
    sample_rate_hz: float | None
    memory_mb: float
    us_per_sample: float
    samples_per_second: float
    warnings: list[str]


def model_costs(path: Path) -> tuple[int, int, float | None, int]:
    """(multiply-adds per sample, state floats per stream, sample rate or None, file bytes),
    read from the graph without loading the runtime."""
    import json

    import onnx

    from edgeseq.runtime.graphs.reading import read_model

    proto, raw = read_model(path)
    macs = sum(_numel(t.dims) for t in proto.graph.initializer if len(t.dims) >= 2)
    state = 0
    for node in proto.graph.node:
        if node.op_type in ("RNN", "LSTM", "GRU", "DynamicQuantizeLSTM"):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            hidden = int(attrs.get("hidden_size", 0))
            directions = 2 if attrs.get("direction", b"forward") == b"bidirectional" else 1
            state += hidden * directions * (2 if "LSTM" in node.op_type else 1)
    rate = None
    for prop in proto.metadata_props:
        if prop.key == "edgeseq":
            try:
                value = json.loads(prop.value).get("sample_rate_hz")
            except (ValueError, AttributeError, RecursionError):  # untrusted: no rate then
                value = None
            rate = float(value) if isinstance(value, int | float) and value > 0 else None
    return macs, state, rate, len(raw)


def _numel(dims: Any) -> int:
    total = 1
    for d in dims:
        total *= int(d)
    return total


def check_fit(path: Path, profile: Profile, max_streams: int | None = None,
              sample_rate: float | None = None) -> Fit:  # fmt: skip
    """Estimate the daemon's memory and per-sample time for `path` on `profile`; warn with the
    figures when it does not fit. `sample_rate` overrides the model metadata's."""
    macs, state, rate, size = model_costs(path)
    rate = sample_rate or rate
    streams = max_streams or int(profile.daemon.get("max_streams", 1000))
    table_mb = streams * (state * 4 + PER_STREAM_OVERHEAD_BYTES) / 2**20
    memory = BASE_RSS_MB + 4 * size / 2**20 + table_mb  # file, graph, packed plan, verification
    us = macs / profile.macs_per_second * 1e6 + profile.overhead_us
    per_second = 1e6 / us
    warnings = []
    limit = float(profile.daemon.get("memory_limit_mb", profile.memory_mb))
    if memory > limit:
        warnings.append(
            f"estimated daemon memory {memory:.0f} MB (base {BASE_RSS_MB:.0f} + model "
            f"{4 * size / 2**20:.1f} + {streams:,} streams {table_mb:.1f}) exceeds the "
            f"{limit:.0f} MB limit of {profile.name} ({profile.memory_mb} MB board)"
        )
    if rate is not None:
        needed = rate * streams
        if per_second < rate:
            warnings.append(
                f"one sample takes about {us:,.0f} us on {profile.name} ({macs:,} multiply-adds "
                f"at {profile.macs_per_second:.1e}/s + {profile.overhead_us:.0f} us daemon "
                f"overhead): slower than the model's sample rate of {rate:g} Hz "
                f"({1e6 / rate:,.0f} us per sample)"
            )
        elif per_second < needed:
            warnings.append(
                f"{streams:,} streams at {rate:g} Hz need {needed:,.0f} samples/s; "
                f"{profile.name} manages about {per_second:,.0f} ({us:,.0f} us per sample): "
                f"about {int(per_second / rate):,} streams fit"
            )
    return Fit(macs, state, rate, memory, us, per_second, warnings)
