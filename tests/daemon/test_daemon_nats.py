"""`edgeseq serve --nats`: streams partitioned over three daemons on a real 3-node JetStream
cluster (R3) on 127.0.0.1, each stream's state moving with its partition.

Every test checks answers the way a user would: published into the cluster by a separate
process, collected from `<...>.out.<id>` by another, and compared with `Stream.feed` offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeseq.bench.loadgen.broker import ensure_mosquitto, find
from edgeseq.bench.loadgen.nats_cluster import NatsCluster
from edgeseq.bench.loadgen.nats_workload import answers_by_key, expected_x, sample_table
from edgeseq.bench.loadgen.wire_lines import stream_ids
from edgeseq.runtime import load
from tests.daemon_harness import DEFAULT_MODEL, DaemonProcess, assert_no_traceback, release
from tests.nats_cluster import Tenant, nats_cluster_fixture  # noqa: F401
from tests.wire_fuzz import Fuzzer

pytestmark = pytest.mark.timeout(420)
TOL = 1e-6
# Answers read from the answers' stream: one per sample even if a daemon starved of CPU (two
# cores, the whole suite beside it) lost a lease and answered some samples again.
STORED = 'answers = "stream"\n'


@contextlib.contextmanager
def daemons(tenant: Tenant, count: int, *args: str) -> Iterator[list[DaemonProcess]]:
    """`count` daemons of the tenant's cluster config, each ready (owning its partitions)."""
    started = [
        DaemonProcess(
            str(DEFAULT_MODEL),
            "--config",
            str(tenant.config),
            "--nats-name",
            f"d{k}",
            "--max-streams",
            "5000",
            *args,
        )
        for k in range(count)
    ]
    try:
        for d in started:
            d.wait_for("ready", timeout=120)
        yield started
    finally:
        for d in started:
            release(d)


def collector(
    cluster: NatsCluster,
    tenant: Tenant,
    out: Path,
    expected: int,
    timeout: float = 240.0,
    stream: str | None = None,
) -> subprocess.Popen[str]:
    """The answer collector in its own process, subscribed before it says "ready"; connected to
    nodes 0 and 1 only (node 2 is the one killed: answers are plain NATS messages, and a
    consumer cut off from its server misses them)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgeseq.bench.loadgen.nats_workload",
            "collect",
            ",".join(node.url for node in cluster.nodes[:2]),
            str(out),
            "--expected",
            str(expected),
            "--timeout",
            str(timeout),
            "--subject",
            tenant.subject_out.replace("{id}", ">"),
            *(["--stream", stream] if stream else []),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def finish(proc: subprocess.Popen[str], timeout: float) -> int:
    """The collector's exit code, its pipe closed."""
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


def publish(
    cluster: NatsCluster,
    tenant: Tenant,
    streams: int,
    samples: int,
    first: int = 0,
    prefix: str = "s",
) -> None:
    """Acknowledged publishes from a separate process, as sensors would."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeseq.bench.loadgen.nats_workload",
            cluster.urls,
            "--streams",
            str(streams),
            "--samples",
            str(samples),
            "--features",
            "3",
            "--first-seq",
            str(first),
            "--prefix",
            prefix,
            "--subject",
            tenant.subject_in,
        ],
        check=True,
        capture_output=True,
        timeout=240,
    )


def offline_answers(streams: int, samples: int, prefix: str = "s") -> dict[tuple[str, int], Any]:
    model = load(DEFAULT_MODEL)
    table = sample_table(streams, model.n_features, 0)
    expected = {}
    for i, sid in enumerate(stream_ids(prefix, streams)):
        stream = model.stream()
        for t in range(samples):
            expected[sid, t] = np.asarray(stream.step(expected_x(table, i, t)), np.float64)
    return expected


def check_every_answer(raw: list[bytes], expected: dict[tuple[str, int], Any]) -> int:
    """Every (id, seq) answered, each answer (duplicates too) equal to Stream.feed offline;
    the number of answers published again (a replay's)."""
    by_key, errors = answers_by_key(raw)
    assert not errors, errors[:5]
    missing = sorted(set(expected) - set(by_key))
    assert not missing, f"{len(missing)} samples never answered, e.g. {missing[:5]}"
    assert set(by_key) == set(expected)
    worst = max(
        float(np.abs(np.asarray(a["y"], np.float64) - expected[key]).max())
        for key, answers in by_key.items()
        for a in answers
    )
    assert worst <= TOL, worst
    return sum(len(answers) - 1 for answers in by_key.values())


def taken_over(survivors: list[DaemonProcess], after: list[int]) -> list[dict[str, Any]]:
    return [
        entry
        for d, start in zip(survivors, after, strict=True)
        for entry in d.logs[start:]
        if entry.get("event") == "partition taken"
    ]


@pytest.mark.parametrize("kill_a_server", [False, True], ids=["daemon", "daemon-and-server"])
def test_a_killed_daemons_partitions_move_and_every_sample_is_applied_once(
    nats_cluster: NatsCluster, tmp_path: Path, kill_a_server: bool
) -> None:
    streams, samples, half = 300, 40, 20
    tenant = Tenant.make(nats_cluster, tmp_path, "failover", extra=STORED)
    expected = offline_answers(streams, samples)
    with daemons(tenant, 3) as ds:
        answers = tmp_path / "answers.jsonl"
        collecting = collector(nats_cluster, tenant, answers, streams * samples,
                               stream=f"{tenant.stream}-ANSWERS")  # fmt: skip
        publish(nats_cluster, tenant, streams, half)
        time.sleep(1.5)  # a checkpoint or so: the victim's replay starts behind its last answer
        victim, survivors = ds[1], [ds[0], ds[2]]
        marks = [len(d.logs) for d in survivors]
        victim.kill9()
        if kill_a_server:
            nats_cluster.kill(2)
        publish(nats_cluster, tenant, streams, samples - half, first=half)
        assert finish(collecting, 300) == 0
        moved = taken_over(survivors, marks)
        for d in survivors:
            assert d.stop() == 0, "\n".join(d.raw_stderr[-20:])
            d.close()
            assert_no_traceback(d)
    if kill_a_server:
        nats_cluster.restart(2)
    assert moved, "no survivor took a partition over"
    republished = check_every_answer(answers.read_bytes().splitlines(), expected)
    assert republished == 0  # the answers' stream keeps one per sample (Nats-Msg-Id)


def test_bad_input_on_nats_gets_the_answers_tcp_gives(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """The same bad messages, on NATS (payload per message, id in the subject) and over TCP:
    the same error codes and messages, in the same order for each stream."""
    bad = [
        ("b1", b'{"id": "b1", "seq": 0, "x": [1, 2]}'),
        ("b2", b'{"id": "b2", "seq": 0, "x": [1, 2, "3"]}'),
        ("b3", b'{"id": "b3", "seq": -1, "x": [1, 2, 3]}'),
        ("b4", b'{"id": "b4", "seq": 5, "x": [1, 2, 3]}'),
        ("b5", b'{"id": "b5", "seq": 0, "x": [1e39, 0, 0]}'),
        ("b6", b'{"id": "b6", "seq": 0, "x": [1, 2, 3], "reset": "yes"}'),
        ("b7", b'{"id": "b7", "seq": 0, "x": [NaN, 0, 0]}'),
        ("b8", b'{"id": "b8", "seq": 0}'),
        ("b9", b'{"id": "b9", "seq": 0, "x": [1, 2, 3], "colour": "red"}'),
    ]
    tenant = Tenant.make(nats_cluster, tmp_path, "bad", extra=STORED)
    nats_answers = _nats_conversation(nats_cluster, tenant, tmp_path, bad)
    tcp = DaemonProcess(str(DEFAULT_MODEL), "--listen", "tcp://127.0.0.1:0")
    try:
        tcp.wait_for("ready")
        import socket

        with socket.create_connection(("127.0.0.1", tcp.tcp_port), timeout=30) as sock:
            sock.sendall(b"".join(body + b"\n" for _, body in bad))
            got = b""
            while got.count(b"\n") < len(bad):
                got += sock.recv(1 << 16)
        tcp_answers = [json.loads(line) for line in got.splitlines()]
    finally:
        release(tcp)
    by_id = {a["id"]: a for a in nats_answers}
    for (sid, _), over_tcp in zip(bad, tcp_answers, strict=True):
        assert by_id[sid] == over_tcp, (sid, by_id[sid], over_tcp)


def _nats_conversation(
    cluster: NatsCluster, tenant: Tenant, tmp_path: Path, messages: list[tuple[str, bytes]]
) -> list[dict[str, Any]]:
    answers = tmp_path / f"{tenant.stream}.jsonl"
    with daemons(tenant, 1):
        collecting = collector(cluster, tenant, answers, len(messages), timeout=120,
                               stream=f"{tenant.stream}-ANSWERS")  # fmt: skip
        asyncio.run(_send(cluster, tenant, messages))
        assert finish(collecting, 180) == 0
    return [json.loads(line) for line in answers.read_bytes().splitlines()]


async def _send(cluster: NatsCluster, tenant: Tenant, messages: list[tuple[str, bytes]]) -> None:
    import nats

    nc = await nats.connect(servers=cluster.urls.split(","))
    js = nc.jetstream(timeout=10)
    for sid, body in messages:
        await js.publish(tenant.subject_in.replace("{id}", sid), body)
    await nc.close()


@pytest.mark.parametrize(
    "n_lines",
    [3_000, pytest.param(100_000, marks=[pytest.mark.slow, pytest.mark.timeout(1800)])],
    ids=["3k", "100k"],
)
def test_the_wire_fuzzer_pointed_at_nats_drops_nothing(
    nats_cluster: NatsCluster, tmp_path: Path, n_lines: int
) -> None:
    """The TCP daemon's fuzzer's lines, each one message on the subject of the id it names
    (garbage on a junk id's): one answer per message, each JSON, the valid streams equal to
    Stream.feed offline, and nothing dropped."""
    fuzzer = Fuzzer(seed=20_261_207, conn=0, limit=4096)
    lines = b"".join(fuzzer.chunks(n_lines)).split(b"\n")
    messages = [(_subject_id(line), line) for line in lines if line.strip()]
    tenant = Tenant.make(nats_cluster, tmp_path, "fuzz", extra=STORED)
    answers = tmp_path / "fuzz.jsonl"
    with daemons(tenant, 1, "--max-line-bytes", "4096") as (d,):
        collecting = collector(nats_cluster, tenant, answers, len(messages), timeout=1200,
                               stream=f"{tenant.stream}-ANSWERS")  # fmt: skip
        asyncio.run(_send(nats_cluster, tenant, messages))
        assert finish(collecting, 1300) == 0
        assert d.stop() == 0
        d.close()
        assert_no_traceback(d)
    raw = answers.read_bytes().splitlines()
    assert len(raw) == len(messages)  # one answer each: nothing dropped, nothing twice
    ledger = fuzzer.ledger
    for body in raw:
        ledger.take(body)
    problems = [p for p in ledger.problems if "answers to" not in p]
    assert not problems, problems[:10]
    for stream in ledger.streams.values():  # every valid sample answered as offline
        assert stream.got == len(stream.script), stream.sid


def _subject_id(line: bytes) -> str:
    """The stream a line names, when that can be a subject token; else a junk stream's."""
    try:
        sid = json.loads(line).get("id")
    except (ValueError, AttributeError, RecursionError):
        return "junk"
    ok = isinstance(sid, str) and sid and not any(c in sid for c in ".*> \t\r\n")
    return sid if ok and sid.isprintable() and len(sid.encode()) < 200 else "junk"


def test_mqtt_sensors_publish_into_nats_unchanged(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """mosquitto_pub into nats-server's MQTT listener, on the MQTT daemon's own topics
    (edgeseq/<id>/in), through `edgeseq serve --nats`, to mosquitto_sub on edgeseq/<id>/out."""
    ensure_mosquitto(clients=True)
    tag = f"mq{time.monotonic_ns() % 100_000}"
    tenant = Tenant.make(
        nats_cluster,
        tmp_path,
        "mqtt",
        subject_in=f"{tag}.{{id}}.in",
        subject_out=f"{tag}.{{id}}.out",
    )
    port = nats_cluster.nodes[0].mqtt_port
    assert port is not None
    xs = np.random.default_rng(3).normal(size=(5, 3)).round(4)
    with daemons(tenant, 1):
        sub = subprocess.Popen(
            [
                str(find("mosquitto_sub")),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-t",
                f"{tag}/pump-7/out",
                "-C",
                str(len(xs)),
                "-W",
                "60",
                "-q",
                "1",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0)  # subscribed
        for seq, x in enumerate(xs):
            body = json.dumps({"seq": seq, "x": x.tolist()})
            subprocess.run(
                [
                    str(find("mosquitto_pub")),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-q",
                    "1",
                    "-t",
                    f"{tag}/pump-7/in",
                    "-m",
                    body,
                ],
                check=True,
                timeout=30,
            )
        out, _ = sub.communicate(timeout=90)
    answers = [json.loads(line) for line in out.splitlines()]
    stream = load(DEFAULT_MODEL).stream()
    assert [a["seq"] for a in answers] == list(range(len(xs)))
    for answer, x in zip(answers, xs, strict=True):
        assert answer["id"] == "pump-7"
        assert np.abs(np.asarray(answer["y"]) - stream.step(x)).max() <= TOL


def test_a_stream_of_another_partitioning_is_refused_with_exit_code_1(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    tenant = Tenant.make(nats_cluster, tmp_path, "layout", partitions=16)
    with daemons(tenant, 1):
        pass  # the stream now exists with 16 partitions
    d = DaemonProcess(str(DEFAULT_MODEL), "--config", str(tenant.config), "--nats-partitions", "8")
    try:
        assert d.proc.wait(120) == 1
        d.close()
        refusal = next(e for e in d.logs if e.get("event") == "cannot serve")
        assert "16 partitions" not in refusal["detail"]  # it says what it found and wanted
        assert "partition(16,1)" in refusal["detail"] and "8 partitions" in refusal["detail"]
        assert_no_traceback(d)
    finally:
        release(d)


def test_no_server_reachable_is_said_and_sigterm_still_stops(tmp_path: Path) -> None:
    from edgeseq.bench.loadgen.broker import free_port

    d = DaemonProcess(str(DEFAULT_MODEL), "--nats", f"nats://127.0.0.1:{free_port()}")
    try:
        d.wait_for("cannot reach the NATS cluster yet; retrying", timeout=60)
        assert d.stop() == 0
        d.close()
        assert_no_traceback(d)
    finally:
        release(d)
