"""`edgeseq serve` fed hostile lines (tests/wire_fuzz.py) on several connections at once, and on
stdin: one answer per non-blank line, every answer JSON, no connection dropped, the valid
streams woven among the garbage answered exactly as `Stream.feed` offline, and a daemon that
serves on afterwards.

A 2 KB line of `[[[[...]]]]` once raised RecursionError inside the daemon and cost the client
its connection; the fuzzer exists so that no line can do that again. Each run is seeded: a
failure names its seed and connection, and the same seed replays the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest

from tests.daemon_harness import (
    DEFAULT_MODEL,
    DaemonProcess,
    LineClient,
    assert_no_traceback,
    release,
)
from tests.wire_fuzz import TOL, Fuzzer, Ledger, converse, offline, stdin_ledger

pytestmark = pytest.mark.timeout(300)

SEED = 20_261_207
LIMIT = 4096  # --max-line-bytes: small, so lines just under and over it are cheap
CONNECTIONS = 4


# -- helpers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(*args: str) -> Iterator[DaemonProcess]:
    """A ready TCP daemon with a small line limit; on the way out it must stop on SIGTERM with
    exit code 0 and must never have logged a traceback."""
    d = DaemonProcess(str(DEFAULT_MODEL), "--listen", "tcp://127.0.0.1:0", *args)
    try:
        d.wait_for("ready")
        yield d
        code = d.stop()
        d.close()
        assert code == 0, "\n".join(d.raw_stderr[-20:])
        assert_no_traceback(d)
    finally:
        release(d)


def fuzz_connections(port: int, seed: int, lines: int, timeout: float) -> list[Ledger]:
    """`lines` fuzz lines on each of CONNECTIONS concurrent connections; the last one ends in
    an unterminated line."""

    def one(conn: int) -> Ledger:
        fuzzer = Fuzzer(seed, conn, LIMIT)
        return converse(port, fuzzer, lines, timeout, tail=conn == CONNECTIONS - 1)

    with ThreadPoolExecutor(CONNECTIONS) as pool:
        return list(pool.map(one, range(CONNECTIONS)))


def assert_all_well(ledgers: list[Ledger]) -> Counter[str]:
    """No ledger has a complaint; the error codes seen, counted (for the report)."""
    problems = [p for ledger in ledgers for p in ledger.verdict()]
    assert not problems, "\n".join(problems[:20])
    codes: Counter[str] = sum((ledger.codes for ledger in ledgers), Counter())
    assert codes["internal"] == 0, "the daemon answered some lines with an internal error"
    return codes


def summary(ledgers: list[Ledger], codes: Counter[str]) -> str:
    lines = sum(ledger.lines for ledger in ledgers)
    answers = sum(ledger.taken for ledger in ledgers)
    samples = sum(s.got for ledger in ledgers for s in ledger.streams.values())
    return (
        f"{lines} lines, {answers} answers ({samples} of valid streams checked); "
        f"error codes {dict(codes.most_common())}"
    )


def assert_a_fresh_stream_is_served(port: int) -> None:
    xs = np.random.default_rng(SEED).normal(0.0, 1.0, (5, 3)).astype(np.float32)
    want = offline(xs)
    client = LineClient(port, timeout=10)
    try:
        for seq, x in enumerate(xs):
            got = client.ask({"id": "after-the-fuzz", "seq": seq, "x": x.tolist()})
            assert "y" in got, got
            assert np.abs(np.asarray(got["y"]) - want[seq]).max() <= TOL, got
    finally:
        client.close()


def fuzz_over_tcp(seed: int, lines: int, timeout: float) -> str:
    with serving("--max-line-bytes", str(LIMIT)) as d:
        ledgers = fuzz_connections(d.tcp_port, seed, lines, timeout)
        codes = assert_all_well(ledgers)
        assert d.proc.poll() is None, "the daemon died"
        assert_a_fresh_stream_is_served(d.tcp_port)
    return summary(ledgers, codes)


# -- 1. TCP -------------------------------------------------------------------------------------


def test_fuzzed_lines_on_four_connections_each_get_one_answer_and_spare_the_valid_streams() -> None:
    """16,000 lines (about a third of them valid samples, duplicates and stale seqs of a few
    streams at a time), 4,000 per connection, all four at once."""
    print("\n" + fuzz_over_tcp(SEED, 4_000, timeout=60.0))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_million_fuzzed_lines_each_get_one_answer_and_spare_the_valid_streams() -> None:
    """250,000 lines per connection, four at once: what a day on an exposed port might bring."""
    print("\n" + fuzz_over_tcp(SEED + 1, 250_000, timeout=1500.0))


# -- 2. stdin -----------------------------------------------------------------------------------


def answer_from_stdin(ledger: Ledger, path: Path, timeout: float = 30.0) -> DaemonProcess:
    """A stdin-mode daemon reading `path`, every line of its stdout taken by `ledger`; it must
    exit by itself within `timeout` s (else it is killed and the test fails)."""
    with path.open("rb") as stdin:
        d = DaemonProcess(str(DEFAULT_MODEL), "--max-line-bytes", str(LIMIT), stdin=stdin)
    try:
        out = d.proc.stdout
        assert out is not None
        reader = threading.Thread(target=lambda: [ledger.take(a.rstrip(b"\n")) for a in out])
        reader.start()
        try:
            d.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"the daemon still runs {timeout:.0f} s after its input ended "
                f"({ledger.taken} answers to {ledger.owed + ledger.owed_at_eof} lines):\n"
                + "\n".join(d.raw_stderr[-10:])
            )
        finally:
            if d.proc.poll() is None:
                d.kill9()
            reader.join(10)
    finally:
        d.close()
    return d


def test_fuzzed_lines_on_stdin_each_get_one_answer_and_the_daemon_exits_0_at_the_end(
    tmp_path: Path,
) -> None:
    path = tmp_path / "fuzz.in"
    ledger = stdin_ledger(Fuzzer(SEED + 2, 0, LIMIT), 3_000, path, tail=True)
    d = answer_from_stdin(ledger, path)
    assert d.proc.returncode == 0, "\n".join(d.raw_stderr[-20:])
    assert_no_traceback(d)
    print("\n" + summary([ledger], assert_all_well([ledger])))


# -- 3. the lines that started it ---------------------------------------------------------------

NESTING = {
    "the whole line": b"[" * 1024 + b"]" * 1024,
    "x": b'{"id": "n", "seq": 0, "x": ' + b"[" * 1024 + b"]" * 1024 + b"}",
    "id": b'{"id": ' + b'{"a":' * 400 + b"1" + b"}" * 400 + b', "seq": 0, "x": [1, 2, 3]}',
    "seq": b'{"id": "n", "seq": ' + b"[{" * 700 + b', "x": [1, 2, 3]}',
    "a near-limit line": b"[" * 32_000 + b"]" * 32_000,
}


def answers_on(answers: BinaryIO, n: int) -> list[dict[str, Any]]:
    got = []
    for _ in range(n):
        line = answers.readline()
        assert line, f"the daemon closed the connection after {len(got)} of {n} answers: {got}"
        got.append(json.loads(line))
    return got


@pytest.mark.parametrize("where", list(NESTING))
def test_a_deeply_nested_line_gets_one_error_answer_and_the_connection_lives(where: str) -> None:
    """Nested 1,000 to 32,000 deep (2 KB to 64 KB): one error answer each, then the next sample
    on the same connection is applied."""
    follow = {"id": "n", "seq": 0, "x": [0.5, -0.5, 1.0]}
    with serving() as d:
        sock = socket.create_connection(("127.0.0.1", d.tcp_port), timeout=10)
        with sock, sock.makefile("rb") as answers:
            sock.sendall(NESTING[where] + b"\n" + json.dumps(follow).encode() + b"\n")
            got = answers_on(answers, 2)
            sock.shutdown(socket.SHUT_WR)
            assert answers.readline() == b"", "a third answer to two lines"
    errors = [a for a in got if "error" in a]
    assert len(errors) == 1, got
    applied = [a for a in got if "y" in a]
    want = offline(np.array([follow["x"]], np.float32))[0]
    assert len(applied) == 1 and np.abs(np.asarray(applied[0]["y"]) - want).max() <= TOL, got


# -- 4. how a stream may begin ------------------------------------------------------------------


def test_an_unknown_stream_begins_at_0_with_start_or_reset_or_without_seq_else_resend_0() -> None:
    """The wire contract the fuzzer's valid streams and the kill -9 client rely on: an unknown
    stream may begin at seq 0, with "start": true or "reset": true at any seq, or without seq;
    any other seq is refused with code resend and resend_from 0, and nothing is applied."""
    x = [0.25, -1.0, 2.0]
    want = offline(np.array([x], np.float32))[0]
    with serving() as d:
        client = LineClient(d.tcp_port, timeout=10)
        try:
            begun = [
                client.ask({"id": "b-seq0", "seq": 0, "x": x}),
                client.ask({"id": "b-start", "seq": 7, "x": x, "start": True}),
                client.ask({"id": "b-reset", "seq": 7, "x": x, "reset": True}),
                client.ask({"id": "b-noseq", "x": x}),
            ]
            for got in begun:
                assert "y" in got and np.abs(np.asarray(got["y"]) - want).max() <= TOL, got
            refused = client.ask({"id": "b-late", "seq": 5, "x": x})
            assert refused.get("error", {}).get("code") == "resend", refused
            assert refused["error"].get("resend_from") == 0, refused
            first = client.ask({"id": "b-late", "seq": 0, "x": x})  # nothing applied before
            assert "y" in first and np.abs(np.asarray(first["y"]) - want).max() <= TOL, first
        finally:
            client.close()
