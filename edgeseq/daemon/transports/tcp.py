"""JSON lines over TCP: many concurrent clients, each answer on the connection that sent it.

Backpressure is TCP's own: each connection's reader waits while the shared queue is full or
while its own unsent answers exceed a high-water mark, and a reader that does not read makes
the kernel's buffers fill and the client's writes block. Memory stays bounded either way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from edgeseq.daemon.batcher import Batcher
from edgeseq.daemon.protocol import BadMessage, encode

log = logging.getLogger("edgeseq.daemon")
HIGH_WATER = 1 << 20  # bytes of answers a client may leave unread before its reader pauses


class TcpTransport:
    def __init__(self, batcher: Batcher, host: str, port: int) -> None:
        self.batcher, self.host, self.port = batcher, host, port
        self.server: asyncio.Server | None = None
        self.connections: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        limit = self.batcher.config.max_line_bytes + 1  # + the newline
        self.server = await asyncio.start_server(self._serve, self.host, self.port, limit=limit)
        self.port = self.server.sockets[0].getsockname()[1]
        log.info("listening", extra={"transport": "tcp", "host": self.host, "port": self.port})

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def close_connections(self) -> None:
        for writer in list(self.connections):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        self.connections.add(writer)
        conn = _Connection(writer)
        log.debug("client connected", extra={"peer": str(peer)})
        try:
            await self._read_lines(reader, conn)
            await conn.finish()  # EOF: answer everything this client sent before closing
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self.connections.discard(writer)
            writer.close()
            log.debug("client disconnected", extra={"peer": str(peer)})

    async def _read_lines(self, reader: asyncio.StreamReader, conn: _Connection) -> None:
        limit = self.batcher.config.max_line_bytes
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as end:  # EOF, perhaps after a last line
                if end.partial.strip():
                    await self.batcher.submit(end.partial, conn.expect())
                return
            except asyncio.LimitOverrunError:
                ended = not await _discard_line(reader)
                bad = BadMessage("too_long", f"the line is longer than {limit} bytes; ignored")
                self.batcher.reject(bad, conn.expect())
                if ended:  # the client half-closed in the middle of the long line
                    return
                continue
            if line.strip():
                await self.batcher.submit(line, conn.expect())
            if conn.writer.transport.get_write_buffer_size() > HIGH_WATER:
                await conn.writer.drain()


class _Connection:
    """One client: its writer, and how many of its samples still wait for an answer."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer, self.waiting = writer, 0
        self._idle = asyncio.Event()
        self._idle.set()

    def expect(self) -> Callable[[dict[str, Any]], None]:
        """A reply function for one more sample."""
        self.waiting += 1
        self._idle.clear()
        return self._reply

    def _reply(self, answer: dict[str, Any]) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            self._idle.set()
        if not self.writer.is_closing():
            self.writer.write(encode(answer))

    async def finish(self) -> None:
        await self._idle.wait()
        await self.writer.drain()


async def _discard_line(reader: asyncio.StreamReader) -> bool:
    """Skip the rest of an over-long line, chunk by chunk (never holding it whole); False if
    the input ended first."""
    while True:
        try:
            await reader.readuntil(b"\n")
            return True
        except asyncio.LimitOverrunError as over:
            await reader.readexactly(over.consumed)
        except asyncio.IncompleteReadError:
            return False
