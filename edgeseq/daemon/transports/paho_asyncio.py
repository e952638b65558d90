"""paho-mqtt driven by the daemon's event loop instead of a thread of its own.

Why: with paho's own network thread (`loop_start`) every message crossed threads, and the two
threads traded the GIL at Python's switch interval. At QoS 0 paho's thread also read a single
packet per wake-up, so the daemon answered ~1,500 samples/s where the broker alone carried
87,000. Here paho's socket is watched by the event loop (paho's documented external-loop
mode, as aiomqtt uses it): a readable socket is read until it is drained, every message of
that read lands in the transport in the same loop iteration, and publishes queue up and go
out together when the socket is writable. Everything paho calls back runs on the loop's
thread, so the transport needs no locks.

Connecting (a blocking TCP connect inside paho) runs in a worker thread; the socket callbacks
it triggers are handed to the loop. After a lost connection it reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger("edgeseq.daemon")
MISC_EVERY = 1.0  # seconds between paho's housekeeping calls (keepalive pings, retries)
DRAIN_READS = 4096  # most loop_read calls per readable event (then other work gets a turn)
RETRY_FIRST, RETRY_MAX = 1.0, 30.0  # seconds between reconnection attempts


READ_AHEAD = 1 << 18  # bytes one recv may bring for paho to take its packets from


class ReadAheadClient(mqtt.Client):
    """paho's client on a read-ahead socket: paho reads each packet with three recv calls (one
    byte of type, the length byte by byte, the rest), a system call each, 16% of the daemon's
    time at QoS 0; here one recv brings whatever has arrived and paho's reads take from it.
    `_create_socket` is paho's own (private) factory of the connected socket, in the version
    pinned in constraints.txt."""

    def _create_socket(self) -> Any:
        return ReadAhead(super()._create_socket())


class ReadAhead:
    """A socket whose recv() serves from what one larger recv() brought (`buffered`)."""

    def __init__(self, sock: Any) -> None:
        self._sock, self._data, self._at = sock, b"", 0

    @property
    def buffered(self) -> int:
        return len(self._data) - self._at

    def recv(self, size: int) -> bytes:
        if self._at >= len(self._data):
            self._data, self._at = self._sock.recv(max(size, READ_AHEAD)), 0  # may raise EAGAIN
        chunk = self._data[self._at : self._at + size]
        self._at += len(chunk)
        return chunk

    def fileno(self) -> int:
        return int(self._sock.fileno())

    def __getattr__(self, name: str) -> Any:  # send, setblocking, close, setsockopt...
        return getattr(self._sock, name)


class PahoOnLoop:
    """Runs `client`'s network I/O on `loop`; `connect()` once, `close()` on the way out."""

    def __init__(self, client: mqtt.Client, loop: asyncio.AbstractEventLoop) -> None:
        self.client, self.loop = client, loop
        self._sock: Any = None
        self._misc: asyncio.Task[None] | None = None
        self._retry: asyncio.Task[None] | None = None
        self._closing = False
        self._paused: set[str] = set()  # why reading stopped; it goes on when this is empty
        self.packets = 0  # PUBLISH and PUBACK packets read: the transport's callbacks count
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._wrote

    def connect(self) -> None:
        """Start connecting in the background (retrying until it succeeds)."""
        self._retry = self.loop.create_task(self._connect_until_done(), name="mqtt-connect")

    async def _connect_until_done(self) -> None:
        delay = RETRY_FIRST
        while not self._closing:
            try:
                await self.loop.run_in_executor(None, self.client.reconnect)
                return
            except (OSError, mqtt.WebsocketConnectionError) as exc:
                log.warning(
                    "mqtt broker not reachable; retrying",
                    extra={"detail": str(exc), "retry_s": delay},
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    def lost(self) -> None:
        """The connection dropped (paho's on_disconnect): connect again unless closing."""
        if not self._closing and (self._retry is None or self._retry.done()):
            self._retry = self.loop.create_task(self._connect_until_done(), name="mqtt-connect")

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def pause_reading(self, reason: str) -> None:
        """Stop reading for `reason` (the daemon's queue is full, too many answers await the
        broker's acknowledgement): the broker holds what comes next."""
        self._paused.add(reason)
        if self._sock is not None and len(self._paused) == 1:
            self.loop.remove_reader(self._sock)

    def resume_reading(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if self._sock is not None and not self._paused:
                self.loop.add_reader(self._sock, self._readable)

    def closing_now(self) -> None:
        """A disconnect on purpose follows: no reconnecting, and no warning."""
        self._closing = True

    def close(self) -> None:
        self._closing = True
        for task in (self._retry, self._misc):
            if task is not None:
                task.cancel()

    # -- paho's socket callbacks (the loop's thread, or the connecting worker's) ----------------

    def _on_loop(self, call: Any, *args: Any) -> None:
        try:
            running = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            running = False
        if running:
            call(*args)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed: shutting down
                self.loop.call_soon_threadsafe(call, *args)

    def _opened(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._watch, sock)

    def _watch(self, sock: Any) -> None:
        self._sock = sock
        with contextlib.suppress(OSError):  # answers to a lone sample must not wait for Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self._paused:
            self.loop.add_reader(sock, self._readable)
        if self._misc is None or self._misc.done():
            self._misc = self.loop.create_task(self._housekeeping(), name="mqtt-misc")

    def _closed(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._unwatch, sock)

    def _unwatch(self, sock: Any) -> None:
        self.loop.remove_reader(sock)
        self.loop.remove_writer(sock)
        if self._sock is sock:
            self._sock = None

    def _want_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self.loop.add_writer, sock, self._writable)

    def _wrote(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self.loop.remove_writer, sock)

    # -- I/O ----------------------------------------------------------------------------------

    def _readable(self) -> None:
        """Read every packet waiting: loop_read reads just one at QoS 0, so ask again while
        the last call brought a message or an acknowledgement (`packets`, counted by the
        transport's callbacks) or data is left read ahead; a call that brought none found the
        socket drained, or a rarer packet, and the next readable event goes on."""
        sock = self._sock
        for _ in range(DRAIN_READS):
            before = self.packets
            if self.client.loop_read() != mqtt.MQTT_ERR_SUCCESS or sock is not self._sock:
                return
            if self.packets == before and not getattr(sock, "buffered", 0):
                return
        if getattr(sock, "buffered", 0):  # the rest after other work: the socket won't wake us
            self.loop.call_soon(self._readable)

    def _writable(self) -> None:
        """Write what paho queued, corked: paho sends each packet with a call of its own, and
        on a socket without Nagle each call pushed a segment through the whole TCP stack
        (28% of the daemon's time at QoS 0); corked they leave as full segments at the end."""
        sock = self._sock
        corked = sock is not None and _cork(sock, 1)
        try:
            self.client.loop_write()
        finally:
            if corked and sock is self._sock:
                _cork(sock, 0)

    async def _housekeeping(self) -> None:
        while self._sock is not None:
            self.client.loop_misc()
            await asyncio.sleep(MISC_EVERY)


def _cork(sock: Any, on: int) -> bool:
    """TCP_CORK (Linux) on or off; False where there is none."""
    cork = getattr(socket, "TCP_CORK", None)
    if cork is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, cork, on)
    except OSError:
        return False
    return True
