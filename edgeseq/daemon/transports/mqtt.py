"""MQTT (paho-mqtt): samples on `edgeseq/<id>/in`, answers on `edgeseq/<id>/out`, and a retained
status topic with a last will, so a fleet dashboard sees "offline" when the daemon dies.

QoS 1 is at-least-once: the broker may deliver a message again. Two things make that harmless.
The session is persistent (clean_session=False, fixed client id) and a message is acknowledged
only after the broker has its answer, so a sample in flight when the daemon dies is redelivered
rather than lost; and per-stream `seq` numbers make a redelivered sample a duplicate that is
answered from memory, never applied twice.

paho runs on the daemon's event loop (paho_asyncio.py): every message a read brings becomes
part of one parcel, and the parcel's answers are published together. Everything here runs on
the loop's thread. While the batcher's queue is full the socket is not read, so the broker
holds what comes next (TCP flow control), as TCP clients are held.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from typing import Any

import paho.mqtt.client as mqtt

from edgeseq.daemon.batcher import Batcher, Entry, Parcel, refusal
from edgeseq.daemon.protocol import BadMessage, addressed_message, encode, read_message
from edgeseq.daemon.transports.paho_asyncio import BufferedClient, PahoOnLoop

log = logging.getLogger("edgeseq.daemon")
GOODBYE_WAIT = 2.0  # seconds stop() waits for the broker to take the "offline" status
# Answers in flight (awaiting the broker's PUBACK) at most; later ones wait here until earlier
# ones are acknowledged. MQTT's message ids are 16 bits and paho keys its messages in flight by
# id, so past 65,535 answers would collide: a burst of 100,000 lost a third of them so. (The
# socket must be read all along: the acknowledgements come on it.)
UNACKED_MAX = 16_384


class MqttTransport:
    def __init__(self, batcher: Batcher, host: str, port: int, status: dict[str, Any]) -> None:
        config = batcher.config
        self.batcher, self.host, self.port, self.config = batcher, host, port, config
        self._prefix, self._suffix = config.mqtt_in.split("+")
        self._status = status
        self._loop: asyncio.AbstractEventLoop | None = None
        self.client = BufferedClient(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=config.mqtt_client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        self.client.manual_ack_set(True)
        # No cap on answers in flight: with paho's default (20) answers would wait in its queue
        # while their samples' acknowledgements went out, and a crash would lose both.
        self.client.max_inflight_messages_set(0)
        self.client.will_set(config.mqtt_status, self._status_payload("offline"), 1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        if config.mqtt_qos > 0:  # at QoS 0 nothing waits for a publish (and paho builds a
            self.client.on_publish = self._on_publish  # reason code per call for the callback)
        self._subscribed = asyncio.Event()
        self._paho: PahoOnLoop | None = None
        # answer's mid -> (sample's mid, qos): the sample is acknowledged once the broker has
        # its answer, so after a crash at any point either the answer was delivered or the
        # sample is redelivered. paho only writes on the loop, after deliver() recorded the mid.
        self._pending_acks: dict[int, tuple[int, int] | None] = {}
        # answers waiting for a slot in flight (UNACKED_MAX) or for the connection:
        # (topic, body, sample's mid, its qos, the connection it came on)
        self._held: deque[tuple[str, bytes, int, int, int]] = deque()
        self._online = False  # CONNACK received; cleared when the connection drops
        self._connection = 0  # which connection this is (a sample's mid is only its own)
        self._inbox: list[tuple[str, bytes | bytearray, int, int]] = []  # topic, payload, mid, qos
        self._out, self._qos = config.mqtt_out, config.mqtt_qos

    def _status_payload(self, state: str) -> bytes:
        return json.dumps({"status": state, **self._status}).encode()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self.client.connect_async(self.host, self.port, keepalive=30)
        except (OSError, ValueError) as exc:
            raise ConnectionError(f"mqtt://{self.host}:{self.port}: {exc}") from None
        self._paho = PahoOnLoop(self.client, self._loop)
        self._paho.connect()
        broker = f"{self.host}:{self.port}"
        log.info("mqtt client started", extra={"transport": "mqtt", "broker": broker})

    def waiting_for(self) -> str | None:
        """What must happen before the daemon may say "ready" (None: nothing): it is ready
        when subscribed, so a client that publishes on seeing "ready" is not lost."""
        return None if self._subscribed.is_set() else f"the MQTT broker at {self.host}:{self.port}"

    async def until_ready(self) -> None:
        await self._subscribed.wait()

    def stop_reading(self) -> None:
        """On the way out: no more samples (what was read is still answered)."""
        if self._paho is not None:
            self._paho.pause_reading("stopping")

    async def stop(self) -> None:
        info = self.client.publish(self.config.mqtt_status, self._status_payload("offline"), 1,
                                   retain=True)  # fmt: skip
        deadline = time.monotonic() + GOODBYE_WAIT
        while not info.is_published() and time.monotonic() < deadline and self._connected():
            await asyncio.sleep(0.01)
        if self._paho is not None:
            self._paho.closing_now()
        self.client.disconnect()
        while self._connected() and time.monotonic() < deadline:  # DISCONNECT goes out
            await asyncio.sleep(0.01)
        if self._paho is not None:
            self._paho.close()

    def _connected(self) -> bool:
        return self._paho is not None and self._paho.connected

    # -- paho's thread -------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:  # fmt: skip
        if reason.is_failure:
            log.error("mqtt connection refused", extra={"reason": str(reason)})
            return
        self._online = True
        client.subscribe(self.config.mqtt_in, qos=self.config.mqtt_qos)
        client.publish(self.config.mqtt_status, self._status_payload("online"), 1, retain=True)
        self._publish_held()  # answers that waited for the connection
        log.info("mqtt connected", extra={"broker": f"{self.host}:{self.port}",
                                          "topic": self.config.mqtt_in})  # fmt: skip

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:  # fmt: skip
        level = logging.INFO if self._paho is None or self._paho.closing else logging.WARNING
        log.log(level, "mqtt disconnected", extra={"reason": str(reason)})
        # Samples whose answers were not acknowledged come again (persistent session): they
        # are answered as duplicates then, and acknowledged.
        self._online = False
        self._connection += 1  # message ids of the old connection must not be acked on the next
        self._pending_acks.clear()
        if self._paho is not None:
            self._paho.lost()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        """Messages of one read gather here; the loop takes them as one parcel right after."""
        if self._paho is not None:
            self._paho.packets += 1
        if not self._inbox:
            assert self._loop is not None
            self._loop.call_soon(self._arrive)
        self._inbox.append((message.topic, message.payload, message.mid, message.qos))

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:  # fmt: skip
        self._subscribed.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:  # fmt: skip
        if self._paho is not None:
            self._paho.packets += 1
        if mid not in self._pending_acks:
            return
        sample = self._pending_acks.pop(mid)
        if sample is not None:
            client.ack(*sample)
        if self._held:
            self._publish_held()

    def _arrive(self) -> None:
        """Every message that has come since the last read, as one parcel."""
        inbox, self._inbox = self._inbox, []
        entries: list[Entry] = []
        context: list[tuple[str, int, int, int]] = []
        for topic, payload, mid, qos in inbox:
            if not self._served(topic):
                # The persistent session may hold a subscription of an earlier configuration.
                log.warning("message on a topic no longer served; dropped", extra={"topic": topic})
                if qos > 0:
                    self.client.ack(mid, qos)
                continue
            topic_id = topic[len(self._prefix) : len(topic) - len(self._suffix)]
            try:
                entries.append(self._parse(topic_id, payload))
            except BadMessage as bad:
                entries.append(refusal(bad))
            except Exception as exc:  # a defect: this message is refused, the rest carry on
                detail = f"the message could not be read: {type(exc).__name__}"
                entries.append(refusal(BadMessage("internal", detail, topic_id)))
            context.append((topic_id, mid, qos, self._connection))
        self.batcher.put(Parcel(self, entries, context=context))
        if self.batcher.full and self._paho is not None:
            self._paho.pause_reading("queue")
            self.batcher.when_room(self._resume_after_queue)

    def _resume_after_queue(self) -> None:
        if self._paho is not None:
            self._paho.resume_reading("queue")

    def _served(self, topic: str) -> bool:
        """topic_matches_sub(mqtt_in, topic) for mqtt_in's one "+": a tenth of the cost."""
        prefix, suffix = self._prefix, self._suffix
        return (
            topic.startswith(prefix)
            and topic.endswith(suffix)
            and len(topic) >= len(prefix) + len(suffix)
            and "/" not in topic[len(prefix) : len(topic) - len(suffix)]
        )

    def _parse(self, topic_id: str, payload: bytes | bytearray) -> Any:
        message, checked_text = addressed_message(topic_id, payload, self.config.max_line_bytes)
        return read_message(message, self.batcher.width, checked_text)

    def deliver(self, parcel: Parcel, lines: bytes) -> None:
        """Publish each answer on its stream's topic; a QoS 1 sample is acknowledged once the
        broker has its answer (_on_publish), so after a crash at any point either the answer
        was delivered or the sample is redelivered."""
        out, held = self._out, self._held
        answers = lines.split(b"\n")[:-1]
        for (topic_id, mid, qos, connection), body in zip(parcel.context, answers, strict=True):
            if body.startswith(b'{"id":null'):  # refused before its id was read: the topic's
                body = b'{"id":' + encode(topic_id)[:-1] + body[10:]
            held.append((out.replace("{id}", topic_id), body, mid, qos, connection))
        self._publish_held()

    def _publish_held(self) -> None:
        """Publish held answers while connected and fewer than UNACKED_MAX are in flight. Every
        answer published at QoS 1 counts (its sample's ack, if any, waits for its PUBACK)."""
        publish, pending, held, qos_out = (
            self.client.publish,
            self._pending_acks,
            self._held,
            self._qos,
        )
        while held and self._online and len(pending) < UNACKED_MAX:
            topic, body, mid, qos, connection = held[0]
            info = publish(topic, body, qos=qos_out)
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                return  # paho is full: this answer goes out after the next acknowledgement
            held.popleft()
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                continue  # no connection: a QoS 1 sample is not acked, so it comes again
            ack = (mid, qos) if qos > 0 and connection == self._connection else None
            if qos_out > 0:
                pending[info.mid] = ack  # acked, if at all, in _on_publish
            elif ack is not None:
                self.client.ack(*ack)  # a QoS 0 answer is as far as it goes once written
