"""`edgeseq serve` as a real subprocess: JSON lines over TCP on 127.0.0.1 (and stdin), checked
against `Stream.feed` offline, plus the Prometheus endpoint, the config file and bad clients.

Every daemon here is started by `tests.daemon_harness.DaemonProcess` with port 0; the port it
bound is read from its "listening" log line. Clients are plain sockets: pipelined clients write
in chunks from one thread and read every answer on another, so finite TCP buffers never
deadlock the test.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon_harness import (
    DEFAULT_MODEL,
    ROOT,
    DaemonProcess,
    LineClient,
    assert_no_traceback,
    offline_predictions,
    release,
)

pytestmark = pytest.mark.timeout(120)

MODEL = DEFAULT_MODEL
N_FEATURES = 3
TOL = 1e-6
CHUNK_LINES = 500  # lines per write of a pipelined client


# -- helpers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def daemon(*args: str, tcp: bool = True, **kwargs: Any) -> Iterator[DaemonProcess]:
    """A serving daemon (TCP on an ephemeral port unless tcp=False), ready; on the way out it
    must stop cleanly on SIGTERM (exit 0) and must never have logged a traceback."""
    listen = ("--listen", "tcp://127.0.0.1:0") if tcp else ()
    d = DaemonProcess(str(MODEL), *listen, *args, **kwargs)
    try:
        d.wait_for("ready")
        yield d
        code = d.stop()
        d.close()  # waits for the collector to read stderr to its end
        assert code == 0, "\n".join(d.raw_stderr[-20:])
        assert_no_traceback(d)
    finally:
        release(d)


def sample(sid: str, seq: int | None, x: Sequence[float], **extra: Any) -> bytes:
    message: dict[str, Any] = {"id": sid, "seq": seq, "x": [float(v) for v in x], **extra}
    if seq is None:
        del message["seq"]
    return json.dumps(message).encode() + b"\n"


def exchange(
    port: int,
    lines: Sequence[bytes],
    expected: int | None = None,
    pause: float = 0.0,
    timeout: float = 60.0,
) -> list[dict[str, Any]]:
    """Pipeline `lines` to the daemon on one connection (chunked writes, `pause` between chunks)
    while another thread reads answers; every answer, in arrival order."""
    expected = len(lines) if expected is None else expected
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    answers: list[bytes] = []
    failure: list[BaseException] = []

    def read() -> None:
        with sock.makefile("rb") as f:
            try:
                while len(answers) < expected:
                    line = f.readline()
                    if not line:
                        raise ConnectionError(f"closed after {len(answers)} of {expected} answers")
                    answers.append(line)
            except BaseException as exc:
                failure.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        for start in range(0, len(lines), CHUNK_LINES):
            sock.sendall(b"".join(lines[start : start + CHUNK_LINES]))
            if pause:
                time.sleep(pause)
        reader.join(timeout)
        assert not reader.is_alive(), f"only {len(answers)} of {expected} answers in {timeout}s"
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        reader.join(5)
    if failure:
        raise failure[0]
    return [json.loads(a) for a in answers]


def by_stream(answers: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for a in answers:
        out.setdefault(a["id"], []).append(a)
    return out


def check_stream(answers: list[dict[str, Any]], seqs: Sequence[int], xs: np.ndarray) -> None:
    """`answers` (one stream's, in arrival order) answer exactly `seqs`, in order, each once,
    with predictions equal to Stream.feed over `xs` (the samples the stream really applied)."""
    errors = [a for a in answers if "error" in a or a.get("duplicate")]
    assert not errors, errors[:3]
    assert [a["seq"] for a in answers] == list(seqs)
    got = np.array([a["y"] for a in answers], np.float64)
    want = offline_predictions(MODEL, xs)
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= TOL


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def metrics(port: int) -> list[tuple[str, dict[str, str], float]]:
    status, text = scrape(port)
    assert status == 200
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def metric(port: int, name: str, **labels: str) -> float | None:
    """The sum of the samples named `name` whose labels include `labels` (None: none)."""
    found = [v for n, lab, v in metrics(port) if n == name and labels.items() <= lab.items()]
    return sum(found) if found else None


def wait_metric(port: int, name: str, want: float, timeout: float = 10.0, **labels: str) -> None:
    deadline = time.monotonic() + timeout
    while (got := metric(port, name, **labels)) != want:
        assert time.monotonic() < deadline, f"{name}{labels} is {got}, expected {want}"
        time.sleep(0.05)


def inputs(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, (*shape, N_FEATURES)).astype(np.float32)


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edgeseq", "serve", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def assert_usage_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]


# -- 1. end to end ------------------------------------------------------------------------------


def test_100_streams_of_1000_samples_from_4_pipelined_clients_match_stream_feed_offline() -> None:
    n_clients, per_client, steps = 4, 25, 1000
    xs = inputs(2024, n_clients * per_client, steps)
    ids = [f"pump-{i}" for i in range(n_clients * per_client)]
    plans = []
    for c in range(n_clients):
        mine = range(c * per_client, (c + 1) * per_client)
        plans.append([sample(ids[s], t, xs[s, t]) for t in range(steps) for s in mine])
    with daemon("--metrics", "127.0.0.1:0") as d:
        port = d.tcp_port
        with ThreadPoolExecutor(n_clients) as pool:
            results = list(pool.map(lambda lines: exchange(port, lines, timeout=80), plans))
        for c, answers in enumerate(results):
            assert len(answers) == per_client * steps
            streams = by_stream(answers)
            assert set(streams) == {ids[s] for s in range(c * per_client, (c + 1) * per_client)}
            for sid, got in streams.items():
                s = ids.index(sid)
                check_stream(got, range(steps), xs[s])
        mport = d.metrics_port
        assert metric(mport, "edgeseq_samples_total", outcome="applied") == len(ids) * steps
        assert metric(mport, "edgeseq_active_streams") == len(ids)


# -- 2. bad inputs ------------------------------------------------------------------------------


def test_bad_messages_get_their_error_code_and_leave_every_stream_untouched() -> None:
    """Bad messages are mixed into a pipelined stream of valid traffic for 8 streams; many of
    them name stream g3 and carry the seq of g3's next valid sample, which must still apply."""
    n_streams, steps, victim = 8, 120, "g3"
    xs = inputs(7, n_streams, steps)

    def padded(n: int) -> bytes:  # a valid g3 sample but for its length (over 1024 bytes)
        return b'{"id": "g3", "seq": 10, "x": [1, 2, 3], "pad": "' + b"z" * n + b'"}'

    bad_at: dict[int, list[tuple[bytes, str, Any, Any]]] = {  # before g3's sample t
        5: [(b'{"id": "g3", "seq": 5, "x": [1.0, 2.0', "bad_json", None, None)],
        10: [(padded(1100), "too_long", None, None), (padded(5000), "too_long", None, None)],
        15: [
            (sample(victim, 15, [1.0, 2.0]), "wrong_features", victim, 15),
            (sample(victim, 15, [1.0, 2.0, 3.0, 4.0]), "wrong_features", victim, 15),
        ],
        20: [
            (b'{"id": "g3", "seq": 20, "x": [NaN, 0.5, 0.5]}', "not_finite", victim, 20),
            (b'{"id": "g3", "seq": 20, "x": [0.5, Infinity, 0.5]}', "not_finite", victim, 20),
            (b'{"id": "g3", "seq": 20, "x": [0.5, 0.5, -Infinity]}', "not_finite", victim, 20),
        ],
        25: [(b'{"seq": 25, "x": [1, 2, 3]}', "missing_id", None, 25)],
        30: [
            (b'{"id": 3, "seq": 30, "x": [1, 2, 3]}', "bad_id", None, 30),
            (b'{"id": ["g3"], "seq": 30, "x": [1, 2, 3]}', "bad_id", None, 30),
            # a lone surrogate: valid JSON, but no answer naming it could be written as UTF-8
            (b'{"id": "g3\\ud800", "seq": 30, "x": [1, 2, 3]}', "bad_id", None, 30),
        ],
        35: [
            (sample(victim, 35, [1, 2, 3], reset="yes"), "bad_control", victim, 35),
            (sample(victim, 35, [1, 2, 3], end=1), "bad_control", victim, 35),
        ],
        40: [
            (sample(victim, 40, [1, 2, 3], reset=True, colour="red"), "unknown_field", victim, 40),
            (b'{"id": "g3", "seq": 40, "x": [1, 2, 3], "\\udc80": 1}', "unknown_field", victim, 40),
        ],
        45: [(sample(victim, -1, [1, 2, 3], reset=True), "bad_seq", victim, None)],
    }
    lines: list[bytes] = []
    expected_errors: Counter[tuple[str, Any, Any]] = Counter()
    for t in range(steps):
        for s in range(n_streams):
            if f"g{s}" == victim:
                for line, code, sid, seq in bad_at.get(t, []):
                    lines.append(line.rstrip(b"\n") + b"\n")
                    expected_errors[(code, sid, seq)] += 1
            lines.append(sample(f"g{s}", t, xs[s, t]))
    with daemon("--max-line-bytes", "1024", "--metrics", "127.0.0.1:0") as d:
        answers = exchange(d.tcp_port, lines)
        errors = [a for a in answers if "error" in a]
        assert Counter((a["error"]["code"], a["id"], a["seq"]) for a in errors) == expected_errors
        assert all(a["error"]["message"] for a in errors)
        streams = by_stream([a for a in answers if "error" not in a])
        assert set(streams) == {f"g{s}" for s in range(n_streams)}
        for s in range(n_streams):
            check_stream(streams[f"g{s}"], range(steps), xs[s])
        # every error answer of g3 came before the answer to the valid sample carrying its seq
        g3 = [a for a in answers if a["id"] == victim]
        for t, bad in bad_at.items():
            known = [(code, seq) for _, code, sid, seq in bad if sid == victim and seq == t]
            if known:
                at = next(i for i, a in enumerate(g3) if a["seq"] == t and "y" in a)
                before = [(a["error"]["code"], a["seq"]) for a in g3[:at] if "error" in a]
                assert before[-len(known) :] == known
        mport = d.metrics_port
        per_code: Counter[str] = Counter()
        for (code, _, _), n in expected_errors.items():
            per_code[code] += n
        for code, n in per_code.items():
            assert metric(mport, "edgeseq_errors_total", code=code) == n, code
        assert metric(mport, "edgeseq_active_streams") == n_streams  # no stream "3", no ["g3"]


def test_new_streams_past_max_streams_get_capacity_errors_while_the_first_ten_keep_working() -> (
    None
):
    steps = 40
    xs = inputs(11, 10, steps)
    flood = [f"flood-{i}" for i in range(60)]
    lines = [sample(f"s{s}", 0, xs[s, 0]) for s in range(10)]
    for t in range(1, steps):
        for s in range(10):
            lines.append(sample(f"s{s}", t, xs[s, t]))
            if t <= len(flood) // 10:
                lines.append(sample(flood[(t - 1) * 10 + s], 0, [0.1, 0.2, 0.3]))
    with daemon("--max-streams", "10", "--metrics", "127.0.0.1:0") as d:
        first = exchange(d.tcp_port, lines[:10])  # the first ten streams exist before the flood
        answers = first + exchange(d.tcp_port, lines[10:])
        refused = [a for a in answers if "error" in a]
        assert sorted(a["id"] for a in refused) == sorted(flood)
        assert {a["error"]["code"] for a in refused} == {"capacity"}
        assert all(a["seq"] == 0 for a in refused)
        streams = by_stream([a for a in answers if "error" not in a])
        assert set(streams) == {f"s{s}" for s in range(10)}
        for s in range(10):
            check_stream(streams[f"s{s}"], range(steps), xs[s])
        mport = d.metrics_port
        assert metric(mport, "edgeseq_active_streams") == 10
        assert metric(mport, "edgeseq_errors_total", code="capacity") == len(flood)
        # an ended stream frees its row for a newcomer
        client = LineClient(d.tcp_port)
        try:
            assert "y" in client.ask(sample("s0", steps, [0, 0, 0], end=True))
            fresh = client.ask(sample(flood[0], 0, xs[0, 0]))
            assert fresh["y"] == pytest.approx(offline_predictions(MODEL, xs[0, :1])[0], abs=TOL)
        finally:
            client.close()


# -- 3. seq semantics ---------------------------------------------------------------------------


def test_duplicate_seq_is_answered_from_memory_stale_seq_is_refused_and_a_gap_is_applied() -> None:
    xs = inputs(3, 8)
    with daemon("--metrics", "127.0.0.1:0") as d:
        mport = d.metrics_port
        client = LineClient(d.tcp_port)
        try:
            first = [client.ask(sample("s", t, xs[t])) for t in range(3)]
            # a redelivered seq 2, even with other values, gets the stored answer, not applied
            dup = client.ask(sample("s", 2, xs[7]))
            assert dup == {"id": "s", "seq": 2, "y": first[2]["y"], "duplicate": True}
            nxt = client.ask(sample("s", 3, xs[3]))
            want = offline_predictions(MODEL, xs[:4])
            assert nxt["y"] == pytest.approx(want[3], abs=TOL)
            stale = client.ask(sample("s", 1, xs[7]))
            assert stale["error"]["code"] == "stale"
            assert (stale["id"], stale["seq"]) == ("s", 1)
            assert metric(mport, "edgeseq_seq_gaps_total") == 0
            # seq 4..9 never came: seq 10 is applied right after seq 3, and the gap counted
            gap = client.ask(sample("s", 10, xs[4]))
            assert gap["y"] == pytest.approx(offline_predictions(MODEL, xs[:5])[4], abs=TOL)
            assert "duplicate" not in gap
            assert metric(mport, "edgeseq_seq_gaps_total") == 1
            # seqs inside the gap are now stale; the next one is not a gap
            assert client.ask(sample("s", 7, xs[5]))["error"]["code"] == "stale"
            after = client.ask(sample("s", 11, xs[5]))
            assert after["y"] == pytest.approx(offline_predictions(MODEL, xs[:6])[5], abs=TOL)
            assert metric(mport, "edgeseq_seq_gaps_total") == 1
            assert metric(mport, "edgeseq_samples_total", outcome="duplicate") == 1
            assert metric(mport, "edgeseq_samples_total", outcome="applied") == 6
            assert metric(mport, "edgeseq_errors_total", code="stale") == 2
        finally:
            client.close()


# -- 4. control fields --------------------------------------------------------------------------


def test_reset_zeroes_the_state_before_the_sample_and_end_drops_the_stream() -> None:
    xs = inputs(4, 12)
    fresh = offline_predictions(MODEL, xs)
    with daemon("--metrics", "127.0.0.1:0") as d:
        mport = d.metrics_port
        client = LineClient(d.tcp_port)
        try:
            for t in range(5):
                client.ask(sample("r", t, xs[t]))
            # reset with a sample: the answer is a fresh stream's first prediction for it
            got = client.ask(sample("r", 5, xs[5], reset=True))["y"]
            assert got == pytest.approx(offline_predictions(MODEL, xs[5:6])[0], abs=TOL)
            got = client.ask(sample("r", 6, xs[6]))["y"]
            assert got == pytest.approx(offline_predictions(MODEL, xs[5:7])[1], abs=TOL)
            # a bare reset
            assert client.ask({"id": "r", "seq": 7, "reset": True}) == {
                "id": "r",
                "seq": 7,
                "ok": True,
            }
            got = client.ask(sample("r", 8, xs[8]))["y"]
            assert got == pytest.approx(offline_predictions(MODEL, xs[8:9])[0], abs=TOL)

            # end with a sample: answered, then the stream is dropped
            for t in range(4):
                client.ask(sample("e", t, xs[t]))
            assert metric(mport, "edgeseq_active_streams") == 2
            got = client.ask(sample("e", 4, xs[4], end=True))["y"]
            assert got == pytest.approx(fresh[4], abs=TOL)
            assert metric(mport, "edgeseq_evictions_total", reason="end") == 1
            assert metric(mport, "edgeseq_active_streams") == 1
            # the same id starts fresh: seq 0 is not stale and the state is new
            got = client.ask(sample("e", 0, xs[9]))["y"]
            assert got == pytest.approx(offline_predictions(MODEL, xs[9:10])[0], abs=TOL)
            # a bare end
            assert client.ask({"id": "e", "seq": 1, "end": True}) == {
                "id": "e",
                "seq": 1,
                "ok": True,
            }
            assert metric(mport, "edgeseq_evictions_total", reason="end") == 2
            assert metric(mport, "edgeseq_active_streams") == 1
            # an ended stream is unknown: it begins again at seq 0 (or with start), not later
            refused = client.ask(sample("e", 1, xs[10]))["error"]
            assert (refused["code"], refused["resend_from"]) == ("resend", 0)
            got = client.ask(sample("e", 0, xs[10]))["y"]
            assert got == pytest.approx(offline_predictions(MODEL, xs[10:11])[0], abs=TOL)
        finally:
            client.close()


# -- 5. idle timeout ----------------------------------------------------------------------------


def test_a_silent_stream_is_evicted_after_the_idle_timeout_and_a_chatty_one_is_not() -> None:
    xs = inputs(5, 20)
    with daemon("--idle-timeout", "1s", "--metrics", "127.0.0.1:0") as d:
        mport = d.metrics_port
        client = LineClient(d.tcp_port)
        try:
            start = time.monotonic()  # before the quiet stream is last heard from
            client.ask(sample("quiet", 0, xs[0]))
            client.ask(sample("chatty", 0, xs[0]))
            assert metric(mport, "edgeseq_active_streams") == 2
            t = 1
            while metric(mport, "edgeseq_evictions_total", reason="idle") != 1:
                assert time.monotonic() - start < 10, "the silent stream was never evicted"
                client.ask(sample("chatty", t, xs[t]))
                t += 1
                time.sleep(0.1)
            assert time.monotonic() - start >= 1.0  # not before the timeout
            assert metric(mport, "edgeseq_active_streams") == 1
            entry = d.wait_for("stream evicted", timeout=5)
            assert (entry["stream"], entry["reason"]) == ("quiet", "idle")
            # the chatty stream kept its state all along
            got = client.ask(sample("chatty", t, xs[t]))["y"]
            assert got == pytest.approx(offline_predictions(MODEL, xs[: t + 1])[t], abs=TOL)
            # the evicted one is unknown now: asked to resend from 0, or begun afresh by start
            refused = client.ask(sample("quiet", 1, xs[1]))["error"]
            assert (refused["code"], refused["resend_from"]) == ("resend", 0)
            got = client.ask(sample("quiet", 1, xs[1], start=True))["y"]
            assert got == pytest.approx(offline_predictions(MODEL, xs[1:2])[0], abs=TOL)
        finally:
            client.close()


# -- 6. metrics endpoint ------------------------------------------------------------------------


def test_metrics_endpoint_serves_probes_and_every_metric_with_the_model_fingerprint() -> None:
    fingerprint = hashlib.sha256(MODEL.read_bytes()).hexdigest()
    xs = inputs(6, 5, 30)
    with daemon("--metrics", "127.0.0.1:0") as d:
        mport = d.metrics_port
        assert scrape(mport, "/healthz")[0] == 200
        assert scrape(mport, "/readyz")[0] == 200
        lines = [sample(f"m{s}", t, xs[s, t]) for t in range(30) for s in range(5)]
        lines += [b"{oops\n", sample("m0", 30, [1.0])]
        answers = exchange(d.tcp_port, lines)
        assert len(answers) == 152
        status, text = scrape(mport)
        assert status == 200
        for name in (
            "edgeseq_samples_total",
            "edgeseq_errors_total",
            "edgeseq_batch_size",
            "edgeseq_step_seconds",
            "edgeseq_latency_seconds",
            "edgeseq_active_streams",
            "edgeseq_queue_depth",
            "edgeseq_checkpoint_age_seconds",
            "edgeseq_model_info",
        ):
            assert f"\n{name}" in text, name
        assert metric(mport, "edgeseq_samples_total", outcome="applied") == 150
        assert metric(mport, "edgeseq_errors_total", code="bad_json") == 1
        assert metric(mport, "edgeseq_errors_total", code="wrong_features") == 1
        assert metric(mport, "edgeseq_errors_total") == 2
        steps = metric(mport, "edgeseq_batch_size_count")
        assert steps is not None and 1 <= steps <= 150
        assert metric(mport, "edgeseq_batch_size_sum") == 150
        assert metric(mport, "edgeseq_step_seconds_count") == steps
        assert metric(mport, "edgeseq_latency_seconds_count") == 152  # every line's answer
        assert metric(mport, "edgeseq_active_streams") == 5
        assert metric(mport, "edgeseq_queue_depth") == 0
        assert metric(mport, "edgeseq_checkpoint_age_seconds") == -1  # no --state-dir
        info = [(lab, v) for n, lab, v in metrics(mport) if n == "edgeseq_model_info"]
        assert len(info) == 1
        assert info[0][0]["fingerprint"] == fingerprint
        assert Path(info[0][0]["path"]).name == MODEL.name
        assert info[0][1] == 1


# -- 7. micro-batching --------------------------------------------------------------------------


def test_samples_of_many_streams_arriving_together_are_stepped_in_batches() -> None:
    n_clients, per_client, steps = 4, 50, 20
    xs = inputs(8, n_clients * per_client, steps)
    plans = [
        [
            sample(f"b{s}", t, xs[s, t])
            for t in range(steps)
            for s in range(c * per_client, (c + 1) * per_client)
        ]
        for c in range(n_clients)
    ]
    with daemon("--metrics", "127.0.0.1:0") as d:
        port = d.tcp_port
        with ThreadPoolExecutor(n_clients) as pool:
            results = list(pool.map(lambda lines: exchange(port, lines), plans))
        streams = by_stream([a for answers in results for a in answers])
        for s in range(n_clients * per_client):
            check_stream(streams[f"b{s}"], range(steps), xs[s])
        mport = d.metrics_port
        total = metric(mport, "edgeseq_batch_size_sum")
        count = metric(mport, "edgeseq_batch_size_count")
        assert total == n_clients * per_client * steps
        assert count is not None and total / count > 1, (total, count)


# -- 8. stdin mode ------------------------------------------------------------------------------


def serve_stdin(tmp_path: Path, text: str, *args: str) -> tuple[int, list[dict[str, Any]]]:
    """`edgeseq serve MODEL ARGS < file`: the exit code and every answer on stdout."""
    path = tmp_path / "samples.in"
    path.write_text(text)
    with path.open("rb") as stdin, contextlib.ExitStack() as stack:
        d = DaemonProcess(str(MODEL), *args, stdin=stdin)
        stack.callback(release, d)
        assert d.proc.stdout is not None
        out = d.proc.stdout.read()
        code = d.proc.wait(30)
        d.close()
        assert_no_traceback(d)
    return code, [json.loads(line) for line in out.decode().splitlines()]


def test_stdin_json_lines_are_all_answered_on_stdout_and_the_daemon_exits_0_at_eof(
    tmp_path: Path,
) -> None:
    n, steps = 4, 250
    xs = inputs(9, n, steps)
    lines = []
    for t in range(steps):
        for s in range(n):
            if (s, t) == (2, 100):
                lines.append('{"id": "k2", "seq": 100, "x": [1, 2]}')
                lines.append('{"id": "k2", "seq": 100, "x": [1, 2, "three"]}')
                lines.append("not json")
            lines.append(sample(f"k{s}", t, xs[s, t]).decode().strip())
    code, answers = serve_stdin(tmp_path, "\n".join(lines) + "\n")
    assert code == 0
    assert len(answers) == n * steps + 3
    errors = [a for a in answers if "error" in a]
    assert sorted((a["error"]["code"], a["id"], a["seq"]) for a in errors) == sorted(
        [("wrong_features", "k2", 100), ("bad_x", "k2", 100), ("bad_json", None, None)]
    )
    streams = by_stream([a for a in answers if "error" not in a])
    for s in range(n):
        check_stream(streams[f"k{s}"], range(steps), xs[s])


def test_stdin_csv_lines_work_the_same_and_a_bad_csv_line_gets_an_error_answer(
    tmp_path: Path,
) -> None:
    n, steps = 3, 200
    xs = inputs(10, n, steps)
    lines = []
    for t in range(steps):
        for s in range(n):
            if (s, t) == (1, 50):
                lines += ["c1,50,1.0,abc,2.0", "c1,50,1.0,2.0", "c1,fifty,1,2,3", ",50,1,2,3"]
            lines.append(f"c{s},{t}," + ",".join(repr(float(v)) for v in xs[s, t]))
    code, answers = serve_stdin(tmp_path, "\n".join(lines), "--format", "csv")  # no last \n
    assert code == 0
    assert len(answers) == n * steps + 4
    errors = [a for a in answers if "error" in a]
    assert sorted((a["error"]["code"], a["id"], a["seq"]) for a in errors) == sorted(
        [
            ("bad_x", "c1", 50),
            ("wrong_features", "c1", 50),
            ("bad_seq", "c1", None),
            ("missing_id", None, 50),
        ]
    )
    streams = by_stream([a for a in answers if "error" not in a])
    for s in range(n):
        check_stream(streams[f"c{s}"], range(steps), xs[s])


# -- 9. config file -----------------------------------------------------------------------------


def test_a_toml_config_is_honoured_and_the_command_line_overrides_it(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(
        f'model = "{MODEL.as_posix()}"\n'
        'listen = "tcp://127.0.0.1:0"\n'
        'metrics = "127.0.0.1:0"\n'
        "max_streams = 2\n"
        'idle_timeout = "10m"\n'
        "max-line-bytes = 4096\n"
    )
    x = [0.1, 0.2, 0.3]

    def third_stream(d: DaemonProcess) -> dict[str, Any]:
        client = LineClient(d.tcp_port)
        try:
            for sid in ("a", "b"):
                assert "y" in client.ask(sample(sid, 0, x))
            return client.ask(sample("c", 0, x))
        finally:
            client.close()

    # the model, listen address, metrics address and max_streams all come from the file
    d = DaemonProcess("--config", str(config))
    try:
        d.wait_for("ready")
        assert third_stream(d)["error"]["code"] == "capacity"
        assert metric(d.metrics_port, "edgeseq_active_streams") == 2
        assert d.stop() == 0
    finally:
        release(d)
    # a command-line option beats the file
    with daemon("--config", str(config), "--max-streams", "3", tcp=False) as d:
        assert "y" in third_stream(d)


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ("max_stream = 3\n", ["max_stream", "unknown setting"]),
        ('max_streams = "many"\n', ["max_streams", "'many'"]),
        ("max_streams = 0\n", ["max_streams"]),
        ('idle_timeout = "soon"\n', ["idle_timeout", "'soon'"]),
        ("watch = 1\n", ["watch"]),
        ("listen = 8000\n", ["listen"]),
        ("max_streams = [\n", ["not valid TOML"]),
    ],
)
def test_a_bad_config_file_exits_2_with_one_error_line_naming_the_key(
    tmp_path: Path, toml: str, words: list[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    assert_usage_error(run_cli(str(MODEL), "--config", str(config)), *words)


@pytest.mark.parametrize(
    "listen",
    [
        "127.0.0.1:7000",
        "http://127.0.0.1:7000",
        "tcp://127.0.0.1",
        "tcp://127.0.0.1:99999",
        "tcp://127.0.0.1:port",
    ],
)
def test_a_bad_listen_value_exits_2_with_a_clear_error(listen: str) -> None:
    assert_usage_error(run_cli(str(MODEL), "--listen", listen), "listen", repr(listen))


def test_a_listen_port_already_in_use_fails_with_one_error_line_and_no_traceback() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(str(MODEL), "--listen", f"tcp://127.0.0.1:{port}")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(port) in errors[0], result.stderr


# -- 10. rude clients ---------------------------------------------------------------------------


def test_clients_that_disconnect_abruptly_do_not_disturb_the_daemon_or_other_clients() -> None:
    n_good, steps = 5, 1500
    xs = inputs(12, n_good, steps)
    good_lines = [sample(f"good-{s}", t, xs[s, t]) for t in range(steps) for s in range(n_good)]

    def rude(k: int) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            if k % 2:  # close with RST instead of FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            body = b"".join(
                sample(f"rude-{k}-{s}", t, [0.1, 0.2, 0.3]) for t in range(100) for s in range(10)
            )
            sock.sendall(body + b'{"id": "rude", "seq": 0, "x": [0.1, 0.')  # half a line
            if k % 3 == 0:
                sock.recv(100)  # read a little of the answers, then go
        finally:
            sock.close()

    with daemon() as d:
        port = d.tcp_port
        with ThreadPoolExecutor(3) as pool:
            good = pool.submit(exchange, port, good_lines, None, 0.01)
            for k in range(16):
                rude(k)
            answers = good.result()
        streams = by_stream(answers)
        for s in range(n_good):
            check_stream(streams[f"good-{s}"], range(steps), xs[s])
        assert d.proc.poll() is None
        client = LineClient(d.tcp_port)
        try:
            got = client.ask(sample("after", 0, xs[0, 0]))
            assert got["y"] == pytest.approx(offline_predictions(MODEL, xs[0, :1])[0], abs=TOL)
        finally:
            client.close()


def test_sigterm_with_an_idle_client_connected_stops_the_daemon_promptly() -> None:
    """The daemon must close its clients' connections on the way out, not wait for them (on
    Python >= 3.12 asyncio's Server.wait_closed() waits for every open connection)."""
    with daemon() as d:
        client = LineClient(d.tcp_port, timeout=20)
        try:
            assert "y" in client.ask(sample("idle", 0, [0.1, 0.2, 0.3]))
            start = time.monotonic()
            d.signal(signal.SIGTERM)
            assert d.proc.wait(15) == 0
            assert time.monotonic() - start < 10
            assert client.file.readline() == b""  # the daemon closed the connection
        finally:
            client.close()


# -- edge cases found while writing these tests ---------------------------------------------------


def test_a_line_of_exactly_max_line_bytes_is_accepted_over_tcp_as_on_stdin(
    tmp_path: Path,
) -> None:
    """--max-line-bytes is the longest accepted message; the newline is not part of it."""
    limit = 1024
    base = b'{"id": "a", "seq": 0, "x": [1, 2, 3]}'
    exact = base[:-1] + b" " * (limit - len(base)) + b"}"
    assert len(exact) == limit
    code, answers = serve_stdin(tmp_path, exact.decode() + "\n", "--max-line-bytes", str(limit))
    assert code == 0 and "y" in answers[0], answers
    with daemon("--max-line-bytes", str(limit)) as d:
        client = LineClient(d.tcp_port)
        try:
            got = client.ask(exact)
            assert "y" in got, got
        finally:
            client.close()


def test_a_client_that_half_closes_after_an_unterminated_over_long_line_gets_every_answer() -> None:
    """EOF in the middle of an over-long line ends that line: the client still gets an answer
    to every sample it sent before it, and the too_long error, before the daemon closes."""
    xs = inputs(14, 10, 100)
    lines = [sample(f"h{s}", t, xs[s, t]) for t in range(100) for s in range(10)]
    with daemon("--max-line-bytes", "1024") as d:
        sock = socket.create_connection(("127.0.0.1", d.tcp_port), timeout=30)
        with sock, sock.makefile("rb") as f:
            sock.sendall(b"".join(lines) + b'{"id": "h0", "seq": 100, "x": [1, 2, 3]' + b" " * 3000)
            sock.shutdown(socket.SHUT_WR)
            answers = [json.loads(line) for line in f]  # until the daemon closes
        assert len(answers) == len(lines) + 1, f"{len(answers)} answers to {len(lines) + 1} lines"
        assert [a["error"]["code"] for a in answers if "error" in a] == ["too_long"]
        streams = by_stream([a for a in answers if "error" not in a])
        for s in range(10):
            check_stream(streams[f"h{s}"], range(100), xs[s])


def test_a_value_too_large_for_float32_is_refused_for_its_own_stream_only() -> None:
    """1e39 is finite as a JSON number but not as float32: it must not spoil other streams'
    samples stepped in the same batch."""
    xs = inputs(13, 20, 2)
    lines = [sample(f"n{s}", 0, xs[s, 0]) for s in range(20)]
    lines.insert(10, sample("huge", 0, [1e39, 0.0, 0.0]))
    lines += [sample(f"n{s}", 1, xs[s, 1]) for s in range(20)]
    with daemon() as d:
        answers = exchange(d.tcp_port, lines)
        others = [a for a in answers if a["id"] != "huge"]
        spoiled = [a for a in others if "error" in a]
        assert not spoiled, f"{len(spoiled)} samples of other streams refused: {spoiled[0]}"
        streams = by_stream(others)
        for s in range(20):
            check_stream(streams[f"n{s}"], range(2), xs[s])
        huge = [a for a in answers if a["id"] == "huge"]
        assert len(huge) == 1 and "error" in huge[0]
        assert huge[0]["error"]["code"] == "not_finite", huge[0]


def test_an_integer_too_large_for_a_float_gets_an_error_answer_and_the_connection_lives() -> None:
    big = b'{"id": "a", "seq": 1, "x": [1' + b"0" * 400 + b", 2, 3]}"
    with daemon() as d:
        client = LineClient(d.tcp_port, timeout=10)
        try:
            assert "y" in client.ask(sample("a", 0, [1, 2, 3]))
            got = client.ask(big)
            assert got.get("error", {}).get("code") in {"not_finite", "bad_x"}, got
            got = client.ask(sample("a", 1, [1, 2, 3]))
            want = offline_predictions(MODEL, np.array([[1, 2, 3], [1, 2, 3]], np.float32))
            assert got["y"] == pytest.approx(want[1], abs=TOL)
        finally:
            client.close()


def test_an_integer_too_large_for_a_float_on_stdin_does_not_hang_the_daemon(
    tmp_path: Path,
) -> None:
    path = tmp_path / "big.jsonl"
    path.write_text(
        '{"id": "a", "seq": 0, "x": [1, 2, 3]}\n'
        '{"id": "a", "seq": 1, "x": [1' + "0" * 400 + ", 2, 3]}\n"
        '{"id": "a", "seq": 1, "x": [1, 2, 3]}\n'
    )
    with path.open("rb") as stdin:
        d = DaemonProcess(str(MODEL), stdin=stdin)
        try:
            try:
                code = d.proc.wait(10)
            except subprocess.TimeoutExpired:
                pytest.fail(
                    "the daemon still runs 10 s after the end of its input:\n"
                    + "\n".join(d.raw_stderr[-12:])
                )
            assert d.proc.stdout is not None
            answers = [json.loads(line) for line in d.proc.stdout.read().splitlines()]
        finally:
            release(d)
    assert code == 0
    assert [("error" in a, a["seq"]) for a in answers] == [(False, 0), (True, 1), (False, 1)]
