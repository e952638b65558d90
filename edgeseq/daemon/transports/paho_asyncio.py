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
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger("edgeseq.daemon")
MISC_EVERY = 1.0  # seconds between paho's housekeeping calls (keepalive pings, retries)
DRAIN_READS = 4096  # most loop_read calls per readable event (then other work gets a turn)
RETRY_FIRST, RETRY_MAX = 1.0, 30.0  # seconds between reconnection attempts


READ_AHEAD = 1 << 18  # bytes one recv may bring for paho to take its packets from
WRITE_BEHIND = 1 << 22  # bytes of paho's packets gathered before paho is told to wait (EAGAIN)


# What every MQTT 3.1.1 PUBACK says besides its message id (3.1.1 has no reason codes or
# properties): made once, where paho builds both anew for each acknowledgement.
PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
PUBACK_PROPERTIES = Properties(PacketTypes.PUBACK)


class BufferedClient(mqtt.Client):
    """paho's client on a buffered socket (BufferedSocket), with lean per-packet handlers.

    These override paho's private methods, in the version pinned in constraints.txt (the tests
    of this module run against it): `_create_socket` is its factory of the connected socket;
    `_handle_pubackcomp` decodes an acknowledgement; `_handle_on_message` dispatches a message.
    At QoS 1 every answer's PUBACK built a ReasonCode and a Properties object (17% of the
    daemon's time under MQTT load, for two bytes of message id), and every message searched a
    tree of topic-filtered callbacks that this client never adds (5%)."""

    def _create_socket(self) -> Any:
        return BufferedSocket(super()._create_socket())

    def _handle_pubackcomp(self, cmd: Any) -> mqtt.MQTTErrorCode:
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or self._protocol != mqtt.MQTTv311 or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)  # MQTT 5, PUBCOMP, or malformed: paho's
        mid = (packet[0] << 8) | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, PUBACK_SUCCESS, PUBACK_PROPERTIES)
        return mqtt.MQTT_ERR_SUCCESS

    def _handle_on_message(self, message: mqtt.MQTTMessage) -> None:
        on_message = self.on_message
        if on_message is not None:
            on_message(self, self._userdata, message)

    def message_callback_add(self, sub: str, callback: Any) -> None:
        raise NotImplementedError("BufferedClient dispatches every message to on_message")


class BufferedSocket:
    """A socket that reads ahead and writes behind, for paho's packet-at-a-time I/O.

    paho reads each packet with three recv calls (one byte of type, the length byte by byte,
    the rest) and sends each packet with a call of its own: a system call each, and without
    Nagle each send pushed a segment through the whole TCP stack (together 40% of the daemon's
    time at QoS 0). Here one recv brings whatever has arrived and paho's reads take from it
    (`buffered` says what is left), and paho's sends gather until `flush()`, which the event
    loop calls once paho has written everything it queued."""

    def __init__(self, sock: Any) -> None:
        self._sock, self._data, self._at = sock, b"", 0
        self._out = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._data) - self._at

    @property
    def unsent(self) -> int:
        return len(self._out)

    def recv(self, size: int) -> bytes:
        if self._at >= len(self._data):
            self._data, self._at = self._sock.recv(max(size, READ_AHEAD)), 0  # may raise EAGAIN
        chunk = self._data[self._at : self._at + size]
        self._at += len(chunk)
        return chunk

    def send(self, data: bytes | bytearray | memoryview) -> int:
        if len(self._out) >= WRITE_BEHIND and not self.flush():
            raise BlockingIOError  # paho keeps the packet queued and tries again later
        self._out += data
        return len(data)

    def flush(self) -> bool:
        """Send what was gathered, as far as the socket takes it; True when all is sent. A
        broken connection drops it (the reader sees the connection end and paho reconnects)."""
        while self._out:
            try:
                sent = self._sock.send(self._out)
            except BlockingIOError:
                return False
            except OSError:
                self._out.clear()
                return True
            del self._out[:sent]
        return True

    def close(self) -> None:
        self.flush()  # a DISCONNECT paho "sent" just before closing must leave
        self._sock.close()

    def fileno(self) -> int:
        return int(self._sock.fileno())

    def __getattr__(self, name: str) -> Any:  # setblocking, setsockopt, ...
        return getattr(self._sock, name)


class PahoOnLoop:
    """Runs `client`'s network I/O on `loop`; `connect()` once, `close()` on the way out."""

    def __init__(self, client: mqtt.Client, loop: asyncio.AbstractEventLoop) -> None:
        self.client, self.loop = client, loop
        self._sock: Any = None
        self._misc: asyncio.Task[None] | None = None
        self._retry: asyncio.Task[None] | None = None
        self._closing = False
        self._paho_wants_write = False  # paho has packets queued (its register callbacks)
        self._paused: set[str] = set()  # why reading stopped; it goes on when this is empty
        self.packets = 0  # PUBLISH and PUBACK packets read: the transport's callbacks count
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._wrote

    def connect(self) -> None:
        """Start connecting in the background (retrying until it succeeds)."""
        self._retry = self.loop.create_task(self._connect_until_done(), name="mqtt-connect")

    async def _connect_until_done(self, wait_first: bool = False) -> None:
        delay = RETRY_FIRST
        if wait_first:  # a refused CONNACK or a session taken over: no reconnect storm
            await asyncio.sleep(delay)
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
            self._retry = self.loop.create_task(
                self._connect_until_done(wait_first=True), name="mqtt-connect"
            )

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
        self._on_loop(self._paho_writes, sock, True)

    def _wrote(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._paho_writes, sock, False)

    def _paho_writes(self, sock: Any, wants: bool) -> None:
        self._paho_wants_write = wants
        self._watch_writes(sock)

    def _watch_writes(self, sock: Any) -> None:
        """Wait for the socket to take more while paho has packets queued or some are unsent."""
        if self._paho_wants_write or getattr(sock, "unsent", 0) > 0:
            self.loop.add_writer(sock, self._writable)
        else:
            self.loop.remove_writer(sock)

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
        """paho writes what it queued (into the socket's buffer), then it leaves in one send."""
        sock = self._sock
        self.client.loop_write()
        if sock is not None and sock is self._sock:
            flush = getattr(sock, "flush", None)
            if flush is not None and not flush() and sock.unsent >= WRITE_BEHIND:
                self.pause_reading("writes")  # the broker does not take our answers: wait
            else:
                self.resume_reading("writes")
            self._watch_writes(sock)

    async def _housekeeping(self) -> None:
        while self._sock is not None:
            self.client.loop_misc()
            await asyncio.sleep(MISC_EVERY)
