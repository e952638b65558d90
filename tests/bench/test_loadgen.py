"""The load generator of `edgeseq loadtest`: real child processes and real sockets on 127.0.0.1.

The null server answers every line exactly once, so the generator, driven against it, must count
every answer and lose none; error answers are counted, never mistaken for results; the verdicts
come from the figures; and nothing the generator imports maps Numba beside the daemon it measures.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeseq.bench.loadgen.children import start_daemon, start_null_server, tcp_port
from edgeseq.bench.loadgen.figures import Figures, Memory, MqttRun, Throughput
from edgeseq.bench.loadgen.neighbours import llvm_neighbours
from edgeseq.bench.loadgen.run import Options, run
from edgeseq.bench.loadgen.section import (
    LOAD_HEADING,
    keep_load_section,
    markdown,
    targets,
    write_section,
)
from edgeseq.bench.loadgen.tcp_workload import many_streams, one_stream
from edgeseq.bench.loadgen.wire_lines import LineCounter, TickBlocks, stream_ids

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "export" / "pump-lstm.onnx"
N_FEATURES = 3


@pytest.fixture(scope="module")
def null_port() -> Iterator[int]:
    with start_null_server() as null:
        yield tcp_port(null)


def _read_lines(sock: socket.socket, expected: int, timeout: float = 10.0) -> int:
    """Lines read until `expected` arrived and then the server closed (or the timeout)."""
    counter, deadline = LineCounter(), time.monotonic() + timeout
    sock.settimeout(timeout)
    while time.monotonic() < deadline:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        counter.feed(chunk)
    assert counter.marks == 0
    return counter.lines


def test_the_null_server_answers_every_line_of_a_pipelined_load_with_exactly_one_line(null_port):
    blocks = TickBlocks(stream_ids("s", 500), N_FEATURES)
    data = b"".join(blocks.block(tick) for tick in range(20))  # 10,000 lines
    with socket.create_connection(("127.0.0.1", null_port), timeout=10) as sock:
        got: list[int] = []
        reader = threading.Thread(target=lambda: got.append(_read_lines(sock, 10_000)))
        reader.start()
        for at in range(0, len(data), 7_919):  # chunks that split lines anywhere
            sock.sendall(data[at : at + 7_919])
        sock.shutdown(socket.SHUT_WR)  # the server closes once it has answered everything
        reader.join(15)
    assert got == [10_000]


def test_the_many_stream_generator_counts_every_answer_of_the_null_server_and_loses_none(
    null_port,
):
    figure = many_streams(null_port, N_FEATURES, streams=300, connections=4, seconds=1.0)
    assert figure.lost == 0 and figure.errors == 0 and figure.duplicates == 0
    assert figure.samples > 0 and figure.samples % 75 == 0  # whole ticks of 300 / 4 streams
    assert figure.p50_us is not None and figure.p99_us is not None
    assert figure.p50_us <= figure.p99_us


def test_the_closed_loop_waits_for_each_answer_before_the_next_sample(null_port):
    figure = one_stream(null_port, N_FEATURES, seconds=0.3)
    assert figure.samples > 10 and figure.lost == 0 and figure.errors == 0
    assert figure.rate <= 1e6 / (figure.p50_us or 1.0) * 1.5  # one sample per round trip


def test_a_tick_is_one_json_line_per_stream_with_the_tick_as_seq():
    ids = stream_ids("pump", 3)
    lines = TickBlocks(ids, N_FEATURES).block(41).splitlines()
    samples = [json.loads(line) for line in lines]
    assert [s["id"] for s in samples] == ids and {s["seq"] for s in samples} == {41}
    assert all(len(s["x"]) == N_FEATURES for s in samples)


def test_error_marks_are_counted_once_even_when_a_chunk_boundary_splits_them():
    data = b'{"id":"a","seq":0,"y":[1.0]}\n{"id":"a","seq":1,"error":{"code":"gap"}}\n' * 3
    for size in (1, 2, 5, 7, 64):
        counter = LineCounter()
        for at in range(0, len(data), size):
            counter.feed(data[at : at + size])
        assert (counter.lines, counter.marks) == (6, 3), size
        assert counter.first_mark == '{"id":"a","seq":1,"error":{"code":"gap"}}'


def test_error_answers_of_the_daemon_are_counted_and_reported_not_taken_for_results():
    """Two features to a three-feature model: every answer is an error, and none is lost."""
    with start_daemon(MODEL, "--listen", "tcp://127.0.0.1:0", "--max-streams", "64") as daemon:
        figure = many_streams(tcp_port(daemon), 2, streams=20, connections=2, seconds=0.5)
    assert figure.samples > 0 and figure.errors == figure.samples and figure.lost == 0
    assert figure.first_error is not None and "wrong_features" in figure.first_error
    assert not figure.clean


def _throughput(rate: float, **faults: int) -> Throughput:
    return Throughput(samples=int(rate * 10), seconds=10.0, p50_us=80.0, p99_us=150.0, **faults)


def _figures(tcp: float = 160_000, p50: float = 80.0, lost: int = 0, mib: float = 120) -> Figures:
    return Figures(
        model="m.onnx", streams=1000, connections=4, command="edgeseq loadtest m.onnx", cores=2,
        ceiling=_throughput(4e6), many=_throughput(tcp, lost=lost),
        solo=Throughput(10_000, 1.0, p50_us=p50, p99_us=2 * p50), pool_rate=320_000.0,
        stdin=_throughput(210_000), stdin_exit=0,
        mqtt=[MqttRun(1, _throughput(20_000), _throughput(11_000)),
              MqttRun(0, _throughput(100_000), _throughput(20_000, lost=3))],
        memory=Memory(118.0, [(60.0, 120.0), (600.0, mib)], _throughput(tcp)),
    )  # fmt: skip


def _verdicts(figures: Figures) -> dict[str, bool | None]:
    return {name: ok for name, _, _, ok in targets(figures)}


def test_the_verdicts_are_computed_from_the_figures():
    good = _verdicts(_figures())
    assert good["TCP, 1,000 streams (samples/s)"] and good["stdin (samples/s)"]
    assert good["TCP, 1 stream, closed loop: p50 latency (us)"]
    assert good["MQTT QoS 1: daemon / broker only"]  # 0.55x >= 0.5x
    assert not good["MQTT QoS 0: daemon / broker only"]  # 0.2x < 0.25x, and 3 lost
    assert good["daemon resident memory (MiB)"]
    assert good["generator ceiling: null server, same TCP load"] is None  # context

    bad = _verdicts(_figures(tcp=149_000, p50=101.0, mib=127.0))
    assert not bad["TCP, 1,000 streams (samples/s)"]
    assert not bad["TCP, 1 stream, closed loop: p50 latency (us)"]
    assert not bad["daemon resident memory (MiB)"]  # 127 / 120 = +5.8%: not flat
    assert not _verdicts(_figures(lost=1))["TCP, 1,000 streams (samples/s)"]  # fast, but lossy


def test_the_section_shows_every_figure_and_verdict_and_replaces_the_old_one(tmp_path):
    report = markdown(_figures())
    assert report.startswith(LOAD_HEADING + "\n") and report.count("\n## ") == 0
    assert (
        "| TCP, 1,000 streams (samples/s) | 160,000 | >= 150,000, none lost, no errors |" in report
    )
    assert "4,000,000 samples/s, 25.0x the daemon's" in report
    assert "320,000 samples/s; the daemon delivers 50%" in report
    assert "| 0 | 100,000 | 20,000 | 0.20 | 0 / 3 | 0 | 0 |" in report
    assert "118 MiB when ready; 120 MiB after 60 s of load, 120 MiB after 600 s (+0.0%" in report
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# Speed\n\nkept\n\n{LOAD_HEADING}\n\nold figures\n")
    write_section(path, report)
    assert path.read_text() == "# Speed\n\nkept\n\n" + report
    assert keep_load_section(path, "# New speed\n").endswith(report)


def test_other_numba_processes_beside_the_daemon_are_called_out_beside_its_memory():
    figures = _figures()
    assert figures.memory is not None and "other Numba" not in markdown(figures)
    figures.memory = dataclasses.replace(figures.memory, neighbours=2)
    assert "(**2 other Numba process(es)**)" in markdown(figures)
    assert "2 other process(es) mapped Numba's LLVM meanwhile" in markdown(figures)


def test_the_neighbour_count_finds_a_process_that_maps_numba_unless_it_is_excluded():
    code = "import numba, sys; sys.stdout.write('up\\n'); sys.stdout.flush(); sys.stdin.read()"
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE) as child:  # fmt: skip
        assert child.stdout is not None and child.stdout.readline() == b"up\n"
        assert child.pid in llvm_neighbours(exclude=set())
        assert child.pid not in llvm_neighbours(exclude={child.pid})
        child.communicate(b"", timeout=30)


def test_a_slow_generator_is_called_out_in_the_section():
    figures = _figures()
    figures.ceiling = _throughput(200_000)  # 1.25x the daemon's 160,000
    assert "may have set the pace" in markdown(figures)


def test_the_load_generator_modules_leave_numba_unimported():
    """A process that maps Numba's LLVM shares its pages with the daemon it measures."""
    modules = sorted(p.stem for p in (ROOT / "edgeseq" / "bench" / "loadgen").glob("[a-z]*.py"))
    assert len(modules) == 15, modules
    code = (
        f"import sys, edgeseq.cli.app, edgeseq.bench.loadgen.run\n"
        f"for m in {modules!r}: __import__('edgeseq.bench.loadgen.' + m)\n"
        "print(sorted(m for m in ('numba', 'llvmlite', 'edgeseq.runtime') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_short_loadtest_measures_every_tcp_and_stdin_workload_against_the_real_daemon():
    options = Options(streams=50, connections=2, seconds=1.0, soak=2.0, solo=0.5,
                      stdin_lines=5_000, mqtt=False, pool_seconds=0.5)  # fmt: skip
    figures = run(MODEL, options)
    for figure in (figures.ceiling, figures.many, figures.solo, figures.stdin):
        assert figure is not None and figure.samples > 0 and figure.clean, figure
    assert figures.stdin_exit == 0 and figures.stdin is not None
    assert figures.stdin.samples == 5_000
    assert figures.memory is not None and figures.memory.at_end[1] > 0
    assert figures.pool_rate is not None and figures.pool_rate > 0
    assert figures.ceiling_ratio > 1  # the null server outruns the daemon
    assert "--streams 50 --connections 2" in markdown(figures)


def test_mqtt_samples_of_every_stream_come_back_through_the_broker_and_through_the_daemon():
    """Mosquitto's own clients as the fleet, for both QoS; installs Mosquitto when missing."""
    from edgeseq.bench.loadgen.mqtt_workload import mqtt_runs

    runs = mqtt_runs(MODEL, N_FEATURES, qos_levels=(1, 0), streams=4, count=25)
    assert [r.qos for r in runs] == [1, 0]
    for r in runs:
        for route in (r.broker_only, r.daemon):
            assert route.samples == 100 and route.clean and route.rate > 0, (r.qos, route)
