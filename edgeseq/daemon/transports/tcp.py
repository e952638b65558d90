"""JSON lines over TCP: many concurrent clients, each answer on the connection that sent it.

Each connection is an asyncio Protocol: every chunk the socket gives is split and parsed in one
go and queued as one parcel; the batcher hands back each parcel's answers, written with one
`write` per connection per batch. Answers to one chunk keep the order of its lines.

Backpressure is TCP's own: a connection stops reading while the shared queue is full or while
its own unsent answers exceed a high-water mark (the client does not read), so the kernel's
buffers fill and the client's writes block. Memory stays bounded either way. At end of input
(the client half-closed) every line sent is answered before the connection closes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from edgeseq.daemon.batcher import Batcher, Parcel
from edgeseq.daemon.lines import LineSplitter

log = logging.getLogger("edgeseq.daemon")
HIGH_WATER = 1 << 20  # bytes of answers a client may leave unread before its reader pauses


class TcpTransport:
    def __init__(self, batcher: Batcher, host: str, port: int) -> None:
        self.batcher, self.host, self.port = batcher, host, port
        self.server: asyncio.Server | None = None
        self.connections: set[Connection] = set()

    def waiting_for(self) -> str | None:
        """Nothing to wait for once started (see MqttTransport.waiting_for)."""
        return None

    async def until_ready(self) -> None:
        return None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: Connection(self), self.host, self.port, reuse_address=True
        )
        self.port = self.server.sockets[0].getsockname()[1]
        log.info("listening", extra={"transport": "tcp", "host": self.host, "port": self.port})

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def stop_reading(self) -> None:
        """On the way out: no more lines from any client (what was read is still answered)."""
        for connection in list(self.connections):
            connection.stop_reading()

    def close_connections(self) -> None:
        for connection in list(self.connections):
            connection.close()


class Connection(asyncio.Protocol):
    """One client: its line splitter, its transport, and how many answers it is owed."""

    def __init__(self, owner: TcpTransport) -> None:
        self.owner, self.batcher = owner, owner.batcher
        self.split = LineSplitter(self.batcher.config.max_line_bytes)
        self.transport: asyncio.Transport | None = None
        self.owed = 0  # lines queued and not yet answered
        self.ended = False  # the client half-closed: close once every line is answered
        self._writing_paused = self._reading_paused = False
        self._stopped = False  # the daemon is stopping: never read again
        self.peer: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None:  # answers to a lone sample must not wait for Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=HIGH_WATER)
        self.owner.connections.add(self)
        log.debug("client connected", extra={"peer": str(self.peer)})

    def data_received(self, data: bytes) -> None:
        self._queue(self.split.push(data))

    def eof_received(self) -> bool:
        self.ended = True
        self._queue(self.split.finish())
        self._close_if_done()
        return True  # keep the transport open to write the answers still owed

    def _queue(self, lines: list[bytes | None]) -> None:
        if not lines:
            return
        entries = self.batcher.parse_lines(lines)
        self.owed += len(entries)
        self.batcher.put(Parcel(self, entries))
        if self.batcher.full:
            self._pause()
            self.batcher.when_room(self._resume)

    def deliver(self, parcel: Parcel, lines: bytes) -> None:
        self.owed -= len(parcel.entries)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(lines)
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self.ended and self.owed == 0 and self.transport is not None:
            self.transport.close()

    # -- flow control ------------------------------------------------------------------------

    def pause_writing(self) -> None:  # the client leaves its answers unread
        self._writing_paused = True
        self._pause()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._resume()

    def _pause(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def stop_reading(self) -> None:
        self._stopped = True
        self._pause()

    def _resume(self) -> None:
        if self._stopped:
            return
        if self._writing_paused or self.batcher.full:
            if self.batcher.full:
                self.batcher.when_room(self._resume)
            return
        if self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = False
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.connections.discard(self)
        self.transport = None  # answers still owed are dropped; their samples were applied
        log.debug("client disconnected", extra={"peer": str(self.peer)})

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
