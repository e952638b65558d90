"""`edgeseq cluster-bench`: the partitioned daemons on a real 3-node JetStream cluster (R3) on
127.0.0.1, measured as users meet them (docs/cluster.md).

- Failover: STREAMS x SAMPLES samples stored in the cluster, three daemons draining them, and
  kill -9 of one daemon when half the answers are in (and, in the second run, of one NATS
  server too). Reported: how long until the survivors own every partition of the dead daemon,
  whether every (id, seq) was answered, how many answers came twice (a replay's), and the
  largest gap between any answer and Stream.feed offline.
- Throughput: the same samples drained by one daemon, then by two, against the TCP daemon on
  the same model in the same run (the TCP load generator of `edgeseq loadtest`).

The samples are stored before the daemons start (a publisher in its own process; JetStream
acknowledges each chunk), so the rate is the daemons' alone; the answers are counted by a
collector in its own process, whose CPU share says whether it could have set the pace.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from edgeseq.bench.loadgen.children import Child, start_daemon, tcp_port
from edgeseq.bench.loadgen.nats_cluster import NatsCluster
from edgeseq.bench.loadgen.nats_workload import answers_by_key, expected_x, sample_table
from edgeseq.bench.loadgen.tcp_workload import many_streams
from edgeseq.bench.loadgen.wire_lines import n_features, stream_ids
from edgeseq.errors import EdgeseqError

CLUSTER_HEADING = "## edgeseq serve --nats: partitions over daemons"
Say = Callable[[str], None]


@dataclass
class Failover:
    label: str
    samples: int
    answered: int  # distinct (id, seq) answered
    duplicates: int  # answers published again (replays after the takeover)
    errors: int
    worst: float  # max |answer - Stream.feed| over every answer
    partitions_moved: int
    takeover_s: float  # kill -9 -> the survivors own every partition of the dead daemon
    seconds: float  # first answer -> last answer


@dataclass
class Rate:
    label: str
    samples: int
    seconds: float
    collector_cpu: float | None = None  # share of one core the collector kept busy

    @property
    def rate(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


class Collecting:
    """The collector process; its progress read by a thread."""

    def __init__(self, cluster: NatsCluster, out: Path, expected: int, subject: str,
                 quiet: float = 2.0, nodes: int | None = None,
                 stream: str | None = None) -> None:  # fmt: skip
        # `nodes`: the first few only, so that a node killed on purpose is not the collector's
        # (answers are plain NATS messages: a consumer cut off from its server misses them)
        urls = ",".join(node.url for node in cluster.nodes[:nodes])
        cmd = [sys.executable, "-m", "edgeseq.bench.loadgen.nats_workload", "collect",
               urls, str(out), "--expected", str(expected), "--timeout", "1200",
               "--subject", subject, "--progress", "--quiet", str(quiet),
               *(["--stream", stream] if stream else [])]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise EdgeseqError("the answer collector did not start")
        self.answers = 0
        self.result: dict[str, Any] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            entry = json.loads(line)
            self.answers = int(entry.get("answers", self.answers))
            if entry.get("done"):
                self.result = entry

    def finish(self) -> dict[str, Any]:
        self.proc.wait(1300)
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return self.result


def _config(folder: Path, cluster: NatsCluster, name: str, answers: str = "plain") -> Path:
    path = folder / f"{name}.toml"
    path.write_text(
        f'[nats]\nservers = "{cluster.urls}"\nstream = "{name.upper()}"\n'
        f'in = "{name}.in.*"\nout = "{name}.out.{{id}}"\nanswers = "{answers}"\n',
        encoding="utf-8",
    )
    return path


def _preload(cluster: NatsCluster, name: str, streams: int, samples: int, features: int) -> None:
    """Store every sample in the cluster (a publisher in its own process), then check."""
    subprocess.run(
        [sys.executable, "-m", "edgeseq.bench.loadgen.nats_workload", cluster.urls,
         "--streams", str(streams), "--samples", str(samples), "--features", str(features),
         "--subject", f"{name}.in.{{id}}", "--preload"],
        check=True, capture_output=True, timeout=1800,
    )  # fmt: skip


def _daemons(model: Path, config: Path, count: int, first: int = 0) -> list[Child]:
    started = [
        start_daemon(
            model, "--config", str(config), "--nats-name", f"d{first + k}", "--max-streams", "20000"
        )
        for k in range(count)
    ]
    for d in started:
        d.wait_for("ready")
    return started


def _create_stream(model: Path, config: Path) -> None:
    """A daemon creates the stream and buckets (and owns nothing for long)."""
    d = start_daemon(model, "--config", str(config), "--nats-name", "creator")
    try:
        d.wait_for("ready")
    finally:
        d.stop()


def _ts(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["ts"]).timestamp()


def _held(d: Child) -> set[int]:
    held: set[int] = set()
    for e in list(d._events):
        if e.get("event") == "partition taken":
            held.add(int(e["partition"]))
        elif e.get("event") in ("partition handed over",):
            held.discard(int(e["partition"]))
    return held


def failover(model: Path, folder: Path, streams: int, samples: int, kill_server: bool,
             say: Say) -> Failover:  # fmt: skip
    features = n_features(model)
    label = "daemon and NATS server killed" if kill_server else "daemon killed"
    name = "failover" + ("s" if kill_server else "")
    with NatsCluster(folder / name, size=3) as cluster:
        config = _config(folder, cluster, name, answers="stream")
        _create_stream(model, config)
        say(f"{label}: storing {streams * samples:,} samples")
        _preload(cluster, name, streams, samples, features)
        out = folder / f"{name}.jsonl"
        # answers published again after the takeover come a lease TTL and more after the kill
        collecting = Collecting(cluster, out, streams * samples, f"{name}.out.>", quiet=15.0,
                                nodes=2, stream=f"{name.upper()}-ANSWERS")  # fmt: skip
        ds = _daemons(model, config, 3)
        try:
            while collecting.answers < streams * samples // 2:
                say(f"{label}: {collecting.answers:,} answers")
                time.sleep(0.1)
            victim, survivors = ds[1], [ds[0], ds[2]]
            held = _held(victim)
            killed_at = time.time()
            victim.proc.kill()
            if kill_server:
                cluster.kill(2)
            takeover = _takeover(survivors, held, killed_at)
            result = collecting.finish()
        finally:
            for d in ds:
                d.stop()
    say(f"{label}: checking every answer against Stream.feed")
    by_key, errors = answers_by_key(out.read_bytes().splitlines())
    worst = _worst(model, streams, samples, by_key)
    return Failover(label, streams * samples, len(by_key),
                    sum(len(a) - 1 for a in by_key.values()), len(errors), worst, len(held),
                    takeover, float(result.get("span", 0.0)))  # fmt: skip


def _takeover(survivors: list[Child], held: set[int], killed_at: float) -> float:
    """Seconds from the kill until every partition the victim held is taken by a survivor."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        taken = {
            int(e["partition"]): _ts(e) for d in survivors for e in list(d._events)
            if e.get("event") == "partition taken" and _ts(e) >= killed_at
        }  # fmt: skip
        if held <= set(taken):
            return max(taken[p] for p in held) - killed_at if held else 0.0
        time.sleep(0.1)
    return float("nan")


def _worst(model_path: Path, streams: int, samples: int, by_key: dict[Any, list[Any]]) -> float:
    """Max |answer - Stream.feed| over every answer; inf if any (id, seq) was never answered.
    (The runtime is imported here, once the measuring is over: see test_loadgen.)"""
    from edgeseq.runtime import load

    model = load(model_path)
    table = sample_table(streams, model.n_features, 0)
    worst = 0.0
    for i, sid in enumerate(stream_ids("s", streams)):
        xs = np.stack([expected_x(table, i, t) for t in range(samples)]).astype(np.float32)
        ys = model.stream().feed(xs)
        for t in range(samples):
            answers = by_key.get((sid, t))
            if not answers:
                return float("inf")
            for a in answers:
                worst = max(worst, float(np.abs(np.asarray(a["y"]) - ys[t]).max()))
    return worst


def drain_rate(model: Path, folder: Path, streams: int, samples: int, daemons: int,
               say: Say, answers: str = "plain") -> Rate:  # fmt: skip
    features = n_features(model)
    name = f"rate{daemons}{answers}"
    with NatsCluster(folder / name, size=3) as cluster:
        config = _config(folder, cluster, name, answers)
        _create_stream(model, config)
        say(f"{daemons} daemon(s): storing {streams * samples:,} samples")
        _preload(cluster, name, streams, samples, features)
        collecting = Collecting(cluster, folder / f"{name}.jsonl", streams * samples,
                                f"{name}.out.>")  # fmt: skip
        ds = [start_daemon(model, "--config", str(config), "--nats-name", f"d{k}",
                           "--max-streams", "20000") for k in range(daemons)]  # fmt: skip
        try:
            while collecting.proc.poll() is None and collecting.answers < streams * samples:
                say(f"{daemons} daemon(s): {collecting.answers:,} answers")
                time.sleep(0.25)
            result = collecting.finish()
        finally:
            for d in ds:
                d.stop()
    span = float(result.get("span", 0.0))
    cpu = float(result["cpu"]) / span if span > 0 and "cpu" in result else None
    stored = ", answers stored (acked)" if answers == "stream" else ""
    label = f"NATS, {daemons} daemon{'s' if daemons > 1 else ''}{stored}"
    return Rate(label, int(result["answers"]),
                span, cpu)  # fmt: skip


def tcp_rate(model: Path, streams: int, seconds: float, say: Say) -> Rate:
    features = n_features(model)
    d = start_daemon(model, "--listen", "tcp://127.0.0.1:0", "--max-streams", "20000")
    try:
        d.wait_for("ready")
        say(f"TCP daemon: {streams:,} streams for {seconds:g} s")
        run = many_streams(tcp_port(d), features, streams, 4, seconds)
    finally:
        d.stop()
    return Rate("TCP, 1 daemon", run.samples, run.seconds, run.generator_cpu)


def run(model: Path, streams: int, samples: int, say: Say) -> tuple[list[Failover], list[Rate]]:
    with tempfile.TemporaryDirectory(prefix="edgeseq-cluster-") as tmp:
        folder = Path(tmp)
        failovers = [failover(model, folder, streams, samples, kill, say) for kill in (False, True)]
        rates = [drain_rate(model, folder, streams, samples, n, say) for n in (1, 2)]
        rates.append(drain_rate(model, folder, streams, samples, 2, say, answers="stream"))
        rates.append(tcp_rate(model, min(streams, 10_000), 20.0, say))
    return failovers, rates


def markdown(model: Path, failovers: list[Failover], rates: list[Rate]) -> str:
    lines = [
        CLUSTER_HEADING,
        "",
        f"`edgeseq cluster-bench {model}`: 3 nats-server nodes (JetStream, R3) and the daemons "
        "on 127.0.0.1, 2 cores shared by all of them; samples stored first, answers collected "
        "by a separate process (docs/cluster.md).",
        "",
        "| run | samples | answered once or more | answered twice (replay) | errors | max abs "
        "gap to Stream.feed | partitions moved | takeover |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in failovers:
        lines.append(
            f"| {f.label} | {f.samples:,} | {f.answered:,} | {f.duplicates:,} | {f.errors} | "
            f"{f.worst:.2g} | {f.partitions_moved} | {f.takeover_s:.1f} s |"
        )
    tcp = next((r.rate for r in rates if r.label.startswith("TCP")), 0.0)
    lines += [
        "",
        "| transport | samples | seconds | samples/s | vs TCP | load generator's CPU (cores) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rates:
        share = f"{r.rate / tcp:.2f}x" if tcp else "-"
        cpu = f"{r.collector_cpu:.2f}" if r.collector_cpu is not None else "-"
        lines.append(
            f"| {r.label} | {r.samples:,} | {r.seconds:.1f} | {r.rate:,.0f} | {share} | {cpu} |"
        )
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace (or append) this section of BENCHMARKS.md; it is the file's last."""
    text = path.read_text() if path.exists() else ""
    head = text.split(CLUSTER_HEADING)[0].rstrip()
    path.write_text((head + "\n\n" if head else "") + section)
