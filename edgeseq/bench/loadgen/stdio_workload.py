"""`edgeseq serve MODEL` reading stdin and answering on stdout, as a pipeline would use it.

Every line is encoded before the clock starts; a writer thread pours them into the daemon's stdin
while a reader thread counts the answer lines on its stdout. The rate is lines over the seconds
from the first write to the last answer. Then stdin is closed: the daemon must answer everything
and exit 0.
"""

from __future__ import annotations

import os
import select
import subprocess
import threading
import time
from pathlib import Path

from edgeseq.bench.loadgen.children import start_daemon
from edgeseq.bench.loadgen.figures import Throughput
from edgeseq.bench.loadgen.wire_lines import LineCounter, TickBlocks, stream_ids
from edgeseq.errors import EdgeseqError

CHUNK = 1 << 20
ANSWER_TIMEOUT = 300.0  # seconds all answers may take, at most
EXIT_TIMEOUT = 60.0  # seconds the daemon may take to exit at the end of stdin


def pipeline(model: Path, n_features: int, lines: int, streams: int) -> tuple[Throughput, int]:
    """At least `lines` lines (whole ticks of `streams` streams) through stdin: the figure, and
    the daemon's exit code once its stdin is closed."""
    streams = max(1, min(streams, lines))
    ticks = -(-lines // streams)
    blocks = TickBlocks(stream_ids("pipe", streams), n_features, seed=3)
    data = [blocks.block(tick) for tick in range(ticks)]
    total = ticks * streams
    daemon = start_daemon(
        model, "--max-streams", str(streams + 16), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        daemon.wait_for("ready")
        figure = _pour(daemon.proc, data, total)
        assert daemon.proc.stdin is not None
        daemon.proc.stdin.close()
        try:
            code = daemon.proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise EdgeseqError(
                f"edgeseq serve did not exit within {EXIT_TIMEOUT:.0f} s of the end of its stdin"
            ) from None
    finally:
        daemon.stop()
    return figure, code


def _pour(proc: subprocess.Popen[bytes], data: list[bytes], total: int) -> Throughput:
    assert proc.stdin is not None and proc.stdout is not None
    sink, fd = proc.stdin, proc.stdout.fileno()
    failure: list[str] = []

    def write() -> None:
        try:
            for block in data:
                sink.write(block)
            sink.flush()
        except (OSError, ValueError) as exc:
            failure.append(f"writing stdin: {exc!r}")

    counter, last = LineCounter(), 0.0
    writer = threading.Thread(target=write, daemon=True)
    begin = time.perf_counter()
    writer.start()
    while counter.lines < total and time.perf_counter() - begin < ANSWER_TIMEOUT:
        if not select.select([fd], [], [], 0.5)[0]:
            if proc.poll() is not None:
                break
            continue
        chunk = os.read(fd, CHUNK)
        if not chunk:
            break
        last = time.perf_counter()
        counter.feed(chunk)
    writer.join(10)
    if counter.lines == 0:
        raise EdgeseqError(
            f"edgeseq serve answered none of {total:,} lines on stdout {failure or ''}".strip()
        )
    return Throughput(
        samples=min(counter.lines, total),
        seconds=last - begin,
        errors=counter.marks,
        lost=max(total - counter.lines, 0),
        first_error=counter.first_mark or next(iter(failure), None),
    )
