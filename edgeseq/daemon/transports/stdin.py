"""Lines on stdin, answers on stdout: `cat samples.jsonl | edgeseq serve MODEL.onnx`.

A thread reads stdin in 256 KiB chunks (a pipe, a file or a terminal alike) and hands each chunk
to the event loop as one parcel, waiting while the batcher's queue is full: a slow daemon slows
the reader, never the other way round. Each parcel's answers go to stdout in one write, flushed
once per batch. End of input stops the daemon once every sample read has been answered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from typing import BinaryIO

from edgeseq.daemon.batcher import Batcher, Parcel
from edgeseq.daemon.lines import LineSplitter
from edgeseq.daemon.protocol import is_csv_header

log = logging.getLogger("edgeseq.daemon")
CHUNK = 1 << 18


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

    def deliver(self, parcel: Parcel, lines: bytes) -> None:
        self.sink.write(lines)

    def _flush(self) -> None:
        try:
            self.sink.flush()
        except (BrokenPipeError, ValueError):
            log.warning("stdout closed; answers are no longer delivered")

    def waiting_for(self) -> str | None:
        """Nothing to wait for once started (see MqttTransport.waiting_for)."""
        return None

    async def until_ready(self) -> None:
        return None

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
        lines = self._split.push(chunk) if chunk is not None else self._split.finish()
        csv = self.batcher.config.format == "csv"
        if lines and self._first and csv and lines[0] is not None and is_csv_header(lines[0]):
            lines = lines[1:]  # a header row, as spreadsheets and pandas write them
        self._first = self._first and not lines
        self.batcher.put(Parcel(self, self.batcher.parse_lines(lines)))
        await self.batcher.room()
        if chunk is None:
            self.finished.set()  # the daemon stops, answering what is still queued
