"""The load section of BENCHMARKS.md: each target judged from the figures, then every figure.

The targets are the daemon's promises on a development machine; the generator ceiling and the
runtime's own pool rate are context: the first says the load generator did not set the pace,
the second what share of the runtime's speed the daemon hands on to its clients.
"""

from __future__ import annotations

from pathlib import Path

from edgeseq.bench.loadgen.figures import Figures, MqttRun, Throughput
from edgeseq.bench.loadgen.tcp_workload import IN_FLIGHT

LOAD_HEADING = "## edgeseq serve under load"
TCP_RATE = 150_000.0  # samples/s, many streams over TCP
SOLO_P50_US = 100.0  # one stream, closed loop
STDIN_RATE = 200_000.0
MQTT_SHARE = {1: 0.5, 0: 0.25}  # of the broker-only rate, per QoS
RSS_MIB, RSS_DRIFT = 130.0, 0.05
CREDIBLE = 2.0  # the generator ceiling over the daemon's rate, at least

Target = tuple[str, str, str, bool | None]  # name, measured, goal, met (None: context)


def targets(f: Figures) -> list[Target]:
    """Every target with its verdict, then the context rows."""
    mqtt = [_mqtt_target(qos, f.mqtt_run(qos)) for qos in MQTT_SHARE]
    return [_tcp_target(f), _solo_target(f), _stdin_target(f), *mqtt, _memory_target(f),
            *_context(f)]  # fmt: skip


def _tcp_target(f: Figures) -> Target:
    name, goal = f"TCP, {f.streams:,} streams (samples/s)", f">= {TCP_RATE:,.0f}, none lost"
    ok = f.many.rate >= TCP_RATE and f.many.clean
    return name, f"{f.many.rate:,.0f}{_faults(f.many)}", goal + ", no errors", ok


def _solo_target(f: Figures) -> Target:
    p50 = f.solo.p50_us
    ok = p50 is not None and p50 <= SOLO_P50_US and f.solo.clean
    name = "TCP, 1 stream, closed loop: p50 latency (us)"
    return name, f"{_us(p50)}{_faults(f.solo)}", f"<= {SOLO_P50_US:,.0f}", ok


def _context(f: Figures) -> list[Target]:
    ceiling = f"{f.ceiling.rate:,.0f} samples/s, {f.ceiling_ratio:,.1f}x the daemon's"
    pool = "not measured"
    if f.pool_rate:
        pool = f"{f.pool_rate:,.0f} samples/s; the daemon delivers {f.many.rate / f.pool_rate:.0%}"
    return [
        ("generator ceiling: null server, same TCP load", ceiling,
         f"context (credible at >= {CREDIBLE:.0f}x)", None),
        (f"runtime: model.pool({f.streams:,}).step, one thread", pool, "context", None),
    ]  # fmt: skip


def _stdin_target(f: Figures) -> Target:
    name, goal = "stdin (samples/s)", f">= {STDIN_RATE:,.0f}, exit 0, none lost"
    if f.stdin is None:
        return name, "not measured", goal, None
    ok = f.stdin.rate >= STDIN_RATE and f.stdin.clean and f.stdin_exit == 0
    return name, f"{f.stdin.rate:,.0f}{_faults(f.stdin)}, exit {f.stdin_exit}", goal, ok


def _mqtt_target(qos: int, run: MqttRun | None) -> Target:
    name = f"MQTT QoS {qos}: daemon / broker only"
    goal = f">= {MQTT_SHARE[qos]:.2f}x, none lost"
    if run is None:
        return name, "not measured", goal, None
    measured = (
        f"{run.share:.2f}x ({run.daemon.rate:,.0f} / {run.broker_only.rate:,.0f})"
        f"{_faults(run.daemon)}"
    )
    return name, measured, goal, run.share >= MQTT_SHARE[qos] and run.daemon.clean


def _memory_target(f: Figures) -> Target:
    name = "daemon resident memory (MiB)"
    goal = f"<= {RSS_MIB:.0f}, flat within {RSS_DRIFT:.0%}"
    m = f.memory
    if m is None or not m.readings:
        return name, "not measured", goal, None
    measured = f"{m.peak:.0f} at most, {m.drift:+.1%} over the soak"
    if m.neighbours:
        measured += f" (**{m.neighbours} other Numba process(es)**)"
    return name, measured, goal, m.peak <= RSS_MIB and abs(m.drift) <= RSS_DRIFT


def _faults(t: Throughput) -> str:
    return "" if t.clean else f" (**{t.lost:,} lost, {t.errors:,} errors**)"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "**no**")


def markdown(f: Figures) -> str:
    """The whole load section, under LOAD_HEADING."""
    lines = [
        LOAD_HEADING,
        "",
        f"`{f.command}`: the daemon and the load generator are separate processes on one machine "
        f"({f.cores} CPUs between them), talking as clients do: JSON lines over loopback TCP "
        "and stdin, MQTT through a Mosquitto broker started for the run. Latency is from writing "
        "a sample to reading its answer (many streams: per tick, a block of one sample per "
        f"stream, {IN_FLIGHT} ticks in flight per connection).",
        "",
        "| target | measured | goal | met |",
        "|---|---:|---|---|",
        *(f"| {n} | {m} | {g} | {_verdict(ok)} |" for n, m, g, ok in targets(f)),
        "",
        _credibility(f),
        "",
        *_workloads(f),
        "",
        *_mqtt(f),
        *_memory(f),
        *_errors(f),
    ]
    return "\n".join(lines).rstrip() + "\n"


def _credibility(f: Figures) -> str:
    ratio, cpu = f.ceiling_ratio, f.many.generator_cpu
    busy = "" if cpu is None else f" While driving the daemon it kept {cpu:.2f} CPU busy."
    if ratio >= CREDIBLE:
        return (
            f"The generator's ceiling (the same load against a null server that answers "
            f"without computing) is {ratio:,.1f}x the daemon's rate: the daemon set the pace."
            + busy
        )
    return (
        f"**The generator's ceiling is only {ratio:,.1f}x the daemon's rate: the load "
        "generator may have set the pace, not the daemon.**" + busy
    )


def _workloads(f: Figures) -> list[str]:
    many = f"TCP, {f.streams:,} streams over {f.connections} connections"
    rows = [
        ("null server (generator ceiling)", many, f.ceiling),
        ("null server", "TCP, 1 stream, closed loop", f.solo_ceiling),
        ("edgeseq serve", many, f.many),
        ("edgeseq serve", "TCP, 1 stream, closed loop", f.solo),
        ("edgeseq serve", "stdin to stdout", f.stdin),
    ]
    out = [
        "| server | workload | samples/s | p50 latency us | p99 latency us | errors | lost |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for server, workload, t in rows:
        if t is not None:
            out.append(
                f"| {server} | {workload} | {t.rate:,.0f} | {_us(t.p50_us)} | "
                f"{_us(t.p99_us)} | {t.errors:,} | {t.lost:,} |"
            )
    if f.pool_rate:
        out.append(
            f"| runtime, own process, one thread | model.pool({f.streams:,}).step | "
            f"{f.pool_rate:,.0f} | - | - | - | - |"
        )
    return out


def _mqtt(f: Figures) -> list[str]:
    if not f.mqtt:
        return []
    out = [
        "MQTT: one `mosquitto_pub -l` per stream, one `mosquitto_sub` consumer; the rate runs "
        "from the first publish to the last message received.",
        "",
        "| QoS | broker only samples/s | via edgeseq serve samples/s | ratio | lost: broker only "
        "/ daemon | daemon errors | daemon duplicates |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in f.mqtt:
        out.append(
            f"| {run.qos} | {run.broker_only.rate:,.0f} | {run.daemon.rate:,.0f} | "
            f"{run.share:.2f} | {run.broker_only.lost:,} / {run.daemon.lost:,} | "
            f"{run.daemon.errors:,} | {run.daemon.duplicates:,} |"
        )
    return [*out, ""]


def _memory(f: Figures) -> list[str]:
    m = f.memory
    if m is None or not m.readings:
        return []
    (warm_s, warm), (end_s, end) = m.after_warm_up, m.at_end
    flat = "yes" if abs(m.drift) <= RSS_DRIFT else "**no**"
    shared = ""
    if m.neighbours:
        shared = (
            f" **{m.neighbours} other process(es) mapped Numba's LLVM meanwhile: the pages they "
            "share with the daemon read as its own; measure on a quiet machine.**"
        )
    return [
        f"Resident memory of the daemon under the {f.streams:,}-stream load "
        f"({m.load.rate:,.0f} samples/s, {m.load.lost:,} lost): {m.at_ready:.0f} MiB when "
        f"ready; {warm:.0f} MiB after {warm_s:.0f} s of load, {end:.0f} MiB after "
        f"{end_s:.0f} s ({m.drift:+.1%}; flat means within {RSS_DRIFT:.0%}: {flat}).{shared}",
        "",
    ]


def _errors(f: Figures) -> list[str]:
    named = [("TCP many", f.many), ("TCP solo", f.solo), ("stdin", f.stdin)]
    named += [(f"MQTT QoS {r.qos}", r.daemon) for r in f.mqtt]
    found = [f"- {name}: `{t.first_error}`" for name, t in named if t and t.first_error]
    return ["First error per workload:", "", *found, ""] if found else []


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
