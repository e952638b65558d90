"""Lines on stdin, answers on stdout: `cat samples.jsonl | edgeseq serve MODEL.onnx`.

A thread reads stdin in 64 KiB chunks (a pipe, a file or a terminal alike) and hands each chunk
to the event loop, waiting until the loop has queued its lines: a slow daemon slows the reader,
never the other way round. Answers go to stdout, flushed once per batch. End of input stops the
daemon once every sample read has been answered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from typing import Any, BinaryIO

from edgeseq.daemon.batcher import Batcher
from edgeseq.daemon.protocol import BadMessage, encode, is_csv_header

log = logging.getLogger("edgeseq.daemon")
CHUNK = 1 << 16


class LineSplitter:
    """Bytes in, whole lines out; an over-long line is reported once and skipped."""

    def __init__(self, limit: int) -> None:
        self.limit, self._buf, self._skipping = limit, b"", False

    def push(self, chunk: bytes) -> tuple[list[bytes], int]:
        """(complete lines, how many over-long lines were skipped)."""
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        kept, skipped = [], 0
        for line in lines:
            if self._skipping:
                self._skipping = False  # the tail of a line already reported
                continue
            if len(line) > self.limit:
                skipped += 1
            elif line.strip():
                kept.append(line)
        if len(self._buf) > self.limit:
            if not self._skipping:
                skipped += 1
            self._skipping, self._buf = True, b""
        return kept, skipped

    def finish(self) -> list[bytes]:
        rest, self._buf = self._buf, b""
        return [rest] if rest.strip() and not self._skipping else []


class StdinTransport:
    def __init__(self, batcher: Batcher, source: BinaryIO | None = None,
                 sink: BinaryIO | None = None) -> None:  # fmt: skip
        self.batcher = batcher
        self.source = source or sys.stdin.buffer
        self.sink = sink or sys.stdout.buffer
        self.finished = asyncio.Event()  # end of input, every line queued
        self._split = LineSplitter(batcher.config.max_line_bytes)
        self._first = True  # no line seen yet (a CSV header may come)
        batcher.after_batch.append(self._flush)

    def reply(self, answer: dict[str, Any]) -> None:
        self.sink.write(encode(answer))

    def _flush(self) -> None:
        try:
            self.sink.flush()
        except (BrokenPipeError, ValueError):
            log.warning("stdout closed; answers are no longer delivered")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, args=(loop,), name="stdin", daemon=True).start()
        log.info(
            "reading stdin", extra={"transport": "stdin", "format": self.batcher.config.format}
        )

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        fd = self.source.fileno()
        try:
            while chunk := os.read(fd, CHUNK):
                asyncio.run_coroutine_threadsafe(self._take(chunk), loop).result()
            asyncio.run_coroutine_threadsafe(self._take(None), loop).result()
        except (OSError, RuntimeError) as exc:  # the loop closed under us: shutting down
            log.debug("stdin reader stopped", extra={"detail": str(exc)})

    async def _take(self, chunk: bytes | None) -> None:
        lines, skipped = self._split.push(chunk) if chunk is not None else (self._split.finish(), 0)
        for _ in range(skipped):
            limit = self.batcher.config.max_line_bytes
            bad = BadMessage("too_long", f"the line is longer than {limit} bytes; ignored")
            self.batcher.reject(bad, self.reply)
        csv = self.batcher.config.format == "csv"
        if lines and self._first and csv and is_csv_header(lines[0]):
            lines = lines[1:]  # a header row, as spreadsheets and pandas write them
        self._first = self._first and not (lines or skipped)
        for line in lines:
            await self.batcher.submit(line, self.reply)
        self._flush()  # error answers given at the edge do not wait for a batch
        if chunk is None:
            self.finished.set()
