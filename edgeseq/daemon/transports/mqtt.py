"""MQTT (paho-mqtt): samples on `edgeseq/<id>/in`, answers on `edgeseq/<id>/out`, and a retained
status topic with a last will, so a fleet dashboard sees "offline" when the daemon dies.

QoS 1 is at-least-once: the broker may deliver a message again. Two things make that harmless.
The session is persistent (clean_session=False, fixed client id) and a message is acknowledged
only after its answer is published, so a sample in flight when the daemon dies is redelivered
rather than lost; and per-stream `seq` numbers make a redelivered sample a duplicate that is
answered from memory, never applied twice.

paho runs its network loop in its own thread; messages gather in a list that the event loop
takes whole (one wake-up per burst, not per message) and queues as one parcel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

from edgeseq.daemon.batcher import Batcher, Entry, Parcel, refusal
from edgeseq.daemon.protocol import BadMessage, decode, encode, sample_from_object

log = logging.getLogger("edgeseq.daemon")
EARLY_TTL, EARLY_PRUNE_AT = 10.0, 64  # seconds an unclaimed early ack is kept; when to prune
SUBSCRIBE_WAIT = 10.0  # seconds start() waits for the broker before going on without it


class MqttTransport:
    def __init__(self, batcher: Batcher, host: str, port: int, status: dict[str, Any]) -> None:
        config = batcher.config
        self.batcher, self.host, self.port, self.config = batcher, host, port, config
        self._prefix, self._suffix = config.mqtt_in.split("+")
        self._status = status
        self._loop: asyncio.AbstractEventLoop | None = None
        self.client = mqtt.Client(
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
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self._subscribed = threading.Event()
        # answer's mid -> (sample's mid, qos): the sample is acknowledged once the broker has
        # its answer, so after a crash at any point either the answer was delivered or the
        # sample is redelivered.
        self._pending_acks: dict[int, tuple[int, int]] = {}
        # mids the broker acknowledged before reply() recorded them -> when. Status messages
        # land here too and are never claimed, so entries expire: mids wrap at 65,535, and a
        # stale one must not match a later answer.
        self._published_early: dict[int, float] = {}
        self._acks_lock = threading.Lock()
        self._inbox: list[
            tuple[str, bytes | bytearray, int, int]
        ] = []  # (topic, payload, mid, qos)
        self._inbox_lock = threading.Lock()
        self._woken = False  # a wake-up of the event loop is on its way
        self._out, self._qos = config.mqtt_out, config.mqtt_qos

    def _status_payload(self, state: str) -> bytes:
        return json.dumps({"status": state, **self._status}).encode()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self.client.connect_async(self.host, self.port, keepalive=30)
        except (OSError, ValueError) as exc:
            raise ConnectionError(f"mqtt://{self.host}:{self.port}: {exc}") from None
        self.client.loop_start()
        broker = f"{self.host}:{self.port}"
        log.info("mqtt client started", extra={"transport": "mqtt", "broker": broker})
        # Ready means subscribed: a client that publishes on seeing "ready" must not be lost.
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self._subscribed.wait, SUBSCRIBE_WAIT):
            log.warning("mqtt broker not reachable yet; retrying in the background",
                        extra={"broker": broker})  # fmt: skip

    async def stop(self) -> None:
        info = self.client.publish(self.config.mqtt_status, self._status_payload("offline"), 1,
                                   retain=True)  # fmt: skip
        with contextlib.suppress(RuntimeError, ValueError):
            await asyncio.get_running_loop().run_in_executor(None, info.wait_for_publish, 2.0)
        self.client.disconnect()
        self.client.loop_stop()

    # -- paho's thread -------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:  # fmt: skip
        if reason.is_failure:
            log.error("mqtt connection refused", extra={"reason": str(reason)})
            return
        client.subscribe(self.config.mqtt_in, qos=self.config.mqtt_qos)
        client.publish(self.config.mqtt_status, self._status_payload("online"), 1, retain=True)
        log.info("mqtt connected", extra={"broker": f"{self.host}:{self.port}",
                                          "topic": self.config.mqtt_in})  # fmt: skip

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:  # fmt: skip
        log.warning("mqtt disconnected", extra={"reason": str(reason)})

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        """Messages gather in a list; the event loop is woken once per burst, not per message."""
        with self._inbox_lock:
            self._inbox.append((message.topic, message.payload, message.mid, message.qos))
            if self._woken:
                return
            self._woken = True
        assert self._loop is not None
        # A closed loop (shutting down) raises: not acknowledged, so the broker keeps it.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._arrive)

    # -- the event loop ------------------------------------------------------------------------

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:  # fmt: skip
        self._subscribed.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:  # fmt: skip
        with self._acks_lock:
            sample = self._pending_acks.pop(mid, None)
            if sample is None:  # the broker answered before reply() recorded the mid
                now = time.monotonic()
                self._published_early[mid] = now
                if len(self._published_early) > EARLY_PRUNE_AT:
                    self._published_early = {m: t for m, t in self._published_early.items()
                                             if now - t < EARLY_TTL}  # fmt: skip
        if sample is not None:
            client.ack(*sample)

    def _arrive(self) -> None:
        """Every message that has come since the last wake-up, as one parcel."""
        with self._inbox_lock:
            inbox, self._inbox, self._woken = self._inbox, [], False
        entries: list[Entry] = []
        context: list[tuple[str, int, int]] = []
        for topic, payload, mid, qos in inbox:
            if not mqtt.topic_matches_sub(self.config.mqtt_in, topic):
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
            context.append((topic_id, mid, qos))
        self.batcher.put(Parcel(self, entries, context=context))

    def _parse(self, topic_id: str, payload: bytes | bytearray) -> Any:
        limit = self.config.max_line_bytes
        if len(payload) > limit:
            raise BadMessage(
                "too_long", f"the payload has {len(payload)} bytes; the limit is {limit}"
            )
        try:
            message = decode(payload, "payload")
        except BadMessage as bad:
            raise BadMessage(bad.code, bad.message, topic_id) from None
        if isinstance(message, dict):
            message.setdefault("id", topic_id)
            if message["id"] != topic_id:
                raise BadMessage(
                    "id_mismatch",
                    f"the payload's id {message['id']!r} differs from the topic's {topic_id!r}",
                    topic_id,
                    message.get("seq"),
                )
        return sample_from_object(message, self.batcher.table.model.n_features)

    def deliver(self, parcel: Parcel, lines: bytes) -> None:
        """Publish each answer on its stream's topic; a QoS 1 sample is acknowledged once the
        broker has its answer (_on_publish), so after a crash at any point either the answer
        was delivered or the sample is redelivered."""
        out, publish, ack, qos_out = self._out, self.client.publish, self.client.ack, self._qos
        answers = lines.split(b"\n")[:-1]
        for (topic_id, mid, qos), body in zip(parcel.context, answers, strict=True):
            if body.startswith(b'{"id":null'):  # refused before its id was read: the topic's
                body = b'{"id":' + encode(topic_id)[:-1] + body[10:]
            # Never hold our lock across publish(): paho calls _on_publish holding its own.
            info = publish(out.replace("{id}", topic_id), body, qos=qos_out)
            if qos == 0:
                continue
            queued = info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)
            with self._acks_lock:
                acked_at = self._published_early.pop(info.mid, None)
                early = acked_at is not None and time.monotonic() - acked_at < EARLY_TTL
                if queued and not early and qos_out > 0:
                    self._pending_acks[info.mid] = (mid, qos)  # acked in _on_publish
                    continue
            ack(mid, qos)
