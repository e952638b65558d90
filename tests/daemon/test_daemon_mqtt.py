"""`edgeseq serve --mqtt` against a real Mosquitto broker (tests/mqtt_broker.py starts one).

The daemon runs as a subprocess (tests/daemon_harness.py); the tests talk to it the way a fleet
would: paho-mqtt clients publishing samples on `edgeseq/<id>/in` and collecting answers on
`edgeseq/+/out`. Every prediction is compared with `Stream.feed` on the same samples, offline.

Each test uses its own client ids and stream ids, because the broker lives for the whole session
and the daemon's session is persistent (it outlives the daemon, with its subscription).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from edgeseq.runtime.state_files import load_snapshot
from tests.daemon_harness import DEFAULT_MODEL, DaemonProcess, offline_predictions
from tests.mqtt_broker import mqtt_broker_fixture  # noqa: F401  (the `mqtt_broker` fixture)

MODEL = "export/pump-lstm.onnx"
N_FEATURES = 3
TOLERANCE = 1e-6
Broker = tuple[str, int]


# -- an MQTT client for the tests -------------------------------------------------------------


@dataclass
class Received:
    topic: str
    payload: Any  # the decoded JSON, or the raw bytes when it is not JSON
    retain: bool


class Mqtt:
    """A paho client that subscribes to `topics` (waiting for the broker's SUBACK) and keeps
    every message it receives, in arrival order."""

    def __init__(self, broker: Broker, *topics: str) -> None:
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self._subscribed: set[int] = set()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"edgeseq-test-{uuid.uuid4().hex[:10]}",
            protocol=mqtt.MQTTv311,
        )
        self.client.max_inflight_messages_set(1000)
        self.client.on_connect = lambda client, userdata, flags, reason, props: (
            self._connected.set()
        )
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect(*broker, keepalive=30)
        self.client.loop_start()
        assert self._connected.wait(10), f"the test client could not connect to {broker}"
        for topic in topics:
            self.subscribe(topic)

    def subscribe(self, topic: str) -> None:
        result, mid = self.client.subscribe(topic, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS, f"subscribe {topic}: {result}"
        with self._cond:
            ok = self._cond.wait_for(lambda: mid in self._subscribed, 10)
        assert ok, f"no SUBACK for {topic}"

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        with self._cond:
            self._subscribed.add(mid)
            self._cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            payload: Any = json.loads(message.payload)
        except ValueError:
            payload = bytes(message.payload)
        with self._cond:
            self.messages.append(Received(message.topic, payload, bool(message.retain)))
            self._cond.notify_all()

    def publish(self, topic: str, payload: dict[str, Any] | bytes) -> mqtt.MQTTMessageInfo:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = self.client.publish(topic, body, qos=1)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish {topic}: {info.rc}"
        return info

    def wait(
        self, done: Callable[[list[Received]], bool], timeout: float, what: str
    ) -> list[Received]:
        """Wait until `done(messages)`; a snapshot of the messages."""
        with self._cond:
            ok = self._cond.wait_for(lambda: done(self.messages), timeout)
            snapshot = list(self.messages)
        assert ok, f"timed out after {timeout}s waiting for {what}; {len(snapshot)} messages"
        return snapshot

    def snapshot(self) -> list[Received]:
        with self._cond:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def mqtt_client(broker: Broker, *topics: str) -> Iterator[Mqtt]:
    client = Mqtt(broker, *topics)
    try:
        yield client
    finally:
        client.close()


def wait_quiet(
    client: Mqtt, done: Callable[[list[Received]], bool], quiet: float, timeout: float
) -> list[Received]:
    """Wait until `done(messages)`, or until nothing arrived for `quiet` seconds; a snapshot."""
    deadline = time.monotonic() + timeout
    count, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        messages = client.snapshot()
        if done(messages):
            return messages
        if len(messages) != count:
            count, since = len(messages), time.monotonic()
        elif time.monotonic() - since >= quiet:
            return messages
        time.sleep(0.05)
    return client.snapshot()


def flush(infos: list[mqtt.MQTTMessageInfo], timeout: float = 30.0) -> None:
    """Wait until the broker has acknowledged every publish."""
    deadline = time.monotonic() + timeout
    for info in infos:
        info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        assert info.is_published(), "the broker did not acknowledge a publish in time"


# -- the daemon --------------------------------------------------------------------------------


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


@contextmanager
def start_daemon(broker: Broker, *args: str) -> Iterator[DaemonProcess]:
    """`edgeseq serve MODEL --mqtt ...`, killed if still running at the end; its pipes are
    closed once its log collector has read them to the end (the harness leaves them open, and
    an unclosed pipe is a ResourceWarning, an error in this test suite)."""
    host, port = broker
    before = set(threading.enumerate())
    daemon = DaemonProcess(MODEL, "--mqtt", f"mqtt://{host}:{port}", *args)
    collectors = [t for t in threading.enumerate() if t not in before]
    try:
        with daemon:
            yield daemon
    finally:
        for thread in collectors:
            thread.join(10)
        for pipe in (daemon.proc.stdout, daemon.proc.stderr):
            if pipe is not None:
                pipe.close()


def wait_online(daemon: DaemonProcess, watcher: Mqtt, status_topic: str = "edgeseq/status") -> None:
    """Until the daemon is connected, ready, and subscribed: its retained "online" is published
    right after its SUBSCRIBE on the same connection, so once a watcher sees it the broker has
    the subscription (the "mqtt connected" log line can come before the SUBSCRIBE is sent)."""
    daemon.wait_for("mqtt connected", timeout=30)
    daemon.wait_for("ready", timeout=30)
    pid = daemon.proc.pid
    watcher.wait(
        lambda msgs: any(is_status(m, status_topic, pid, "online") for m in msgs),
        15,
        f"the daemon's (pid {pid}) online status on {status_topic}",
    )


def is_status(message: Received, topic: str, pid: int, state: str) -> bool:
    payload = message.payload
    return (
        message.topic == topic
        and isinstance(payload, dict)
        and payload.get("pid") == pid
        and payload.get("status") == state
    )


# -- answers -----------------------------------------------------------------------------------


def samples(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.normal(size=(n, N_FEATURES)).astype(np.float32)


def sample(xs: np.ndarray, seq: int, sid: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"seq": seq, "x": [float(v) for v in xs[seq]]}
    if sid is not None:
        message["id"] = sid
    return message


def answers_of(messages: list[Received], sid: str, out: str = "edgeseq/{id}/out") -> list[Any]:
    """Every answer published on stream `sid`'s answer topic, in arrival order."""
    topic = out.replace("{id}", sid)
    return [m.payload for m in messages if m.topic == topic]


def answered_seqs(messages: list[Received], sid: str, out: str = "edgeseq/{id}/out") -> set[int]:
    return {a["seq"] for a in answers_of(messages, sid, out) if isinstance(a, dict)}


def predictions(answers: list[Any]) -> list[dict[str, Any]]:
    """The answers that applied a sample: a "y", not marked duplicate."""
    return [a for a in answers if isinstance(a, dict) and "y" in a and not a.get("duplicate")]


def worst_gap(answers: list[dict[str, Any]], expected: np.ndarray) -> float:
    if not answers:
        return 0.0
    got = np.array([a["y"] for a in answers], np.float64)
    want = expected[[a["seq"] for a in answers]].astype(np.float64)
    return float(np.max(np.abs(got - want)))


def mismatches(answers: list[Any], expected: np.ndarray) -> list[int]:
    """Seqs of every answer with a "y" (duplicates too) that differs from the offline one."""
    bad = []
    for a in answers:
        if isinstance(a, dict) and "y" in a:
            gap = np.max(np.abs(np.asarray(a["y"], np.float64) - expected[a["seq"]]))
            if gap > TOLERANCE:
                bad.append(a["seq"])
    return bad


# -- the tests ---------------------------------------------------------------------------------


def test_every_sample_over_mqtt_is_answered_once_and_equals_feeding_offline(
    mqtt_broker: Broker, rng: np.random.Generator
) -> None:
    n_streams, n_steps = 20, 200
    ids = [unique(f"e2e-{i:02d}") for i in range(n_streams)]
    xs = {sid: samples(rng, n_steps) for sid in ids}
    with (
        mqtt_client(mqtt_broker, "edgeseq/+/out", "edgeseq/status") as client,
        start_daemon(mqtt_broker, "--mqtt-client-id", unique("edgeseq-e2e")) as daemon,
    ):
        wait_online(daemon, client)
        infos = []
        for seq in range(n_steps):
            for i, sid in enumerate(ids):
                # half the streams name themselves, half leave the id to the topic
                message = sample(xs[sid], seq, sid if i % 2 == 0 else None)
                infos.append(client.publish(f"edgeseq/{sid}/in", message))
        flush(infos)
        messages = client.wait(
            lambda msgs: all(len(answered_seqs(msgs, sid)) == n_steps for sid in ids),
            60,
            f"{n_streams} x {n_steps} answers",
        )
        assert daemon.stop() == 0
    for sid in ids:
        answers = answers_of(messages, sid)
        errors = [a for a in answers if not isinstance(a, dict) or "y" not in a]
        assert not errors, f"{sid}: error answers {errors[:3]}"
        assert all(a["id"] == sid for a in answers), f"{sid}: an answer names another stream"
        applied = predictions(answers)
        seqs = [a["seq"] for a in applied]
        assert seqs == list(range(n_steps)), f"{sid}: seqs answered out of order or not once"
        expected = offline_predictions(DEFAULT_MODEL, xs[sid])
        assert worst_gap(applied, expected) <= TOLERANCE, sid


def test_a_redelivered_sample_is_answered_as_a_duplicate_and_applied_only_once(
    mqtt_broker: Broker, rng: np.random.Generator
) -> None:
    sid, n_steps = unique("redeliver"), 60
    twice, stale_after = {0, 10, 25, 41}, {30: 5, 50: 49}  # after seq k, send seq v again
    xs = samples(rng, n_steps)
    expected = offline_predictions(DEFAULT_MODEL, xs)
    topic = f"edgeseq/{sid}/in"
    with (
        mqtt_client(mqtt_broker, "edgeseq/+/out", "edgeseq/status") as client,
        start_daemon(mqtt_broker, "--mqtt-client-id", unique("edgeseq-dup")) as daemon,
    ):
        wait_online(daemon, client)
        infos, sent = [], 0
        for seq in range(n_steps):
            infos.append(client.publish(topic, sample(xs, seq, sid)))
            sent += 1
            if seq in twice:  # QoS 1 redelivery: the same message again
                infos.append(client.publish(topic, sample(xs, seq, sid)))
                sent += 1
            if seq in stale_after:  # a late redelivery of an older sample
                infos.append(client.publish(topic, sample(xs, stale_after[seq], sid)))
                sent += 1
        flush(infos)
        messages = client.wait(
            lambda msgs: len(answers_of(msgs, sid)) >= sent, 30, f"{sent} answers"
        )
        assert daemon.stop() == 0
    answers = answers_of(messages, sid)
    assert len(answers) == sent
    applied = predictions(answers)
    assert [a["seq"] for a in applied] == list(range(n_steps)), "every seq is applied once"
    assert worst_gap(applied, expected) <= TOLERANCE
    duplicates = [a for a in answers if a.get("duplicate")]
    assert sorted(a["seq"] for a in duplicates) == sorted(twice)
    assert not mismatches(duplicates, expected), "a duplicate is answered with the first answer"
    stale = [a for a in answers if "error" in a]
    assert [(a["seq"], a["error"]["code"]) for a in stale] == [(5, "stale"), (49, "stale")]


def _checkpoint_seqs(path: Path) -> dict[str, Any]:
    return dict(load_snapshot(path, None).extra["seq"])  # type: ignore[index]


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def test_after_kill_9_redelivery_and_resending_from_the_checkpoint_apply_every_seq_once(
    mqtt_broker: Broker, rng: np.random.Generator, tmp_path: Path
) -> None:
    """The crash story of a real fleet, end to end.

    Stream `steady` was checkpointed after its last answer; stream `busy` is mid-flight when
    the daemon is killed (-9) 50 ms after a checkpoint, so answers it gave after that checkpoint
    are lost with the process, and the broker holds its unacknowledged samples. More samples of
    both are published while the daemon is down (the broker queues them for the persistent
    session). After the restart (same client id, same state dir) the broker delivers what it
    held, and the client, which learns the restored seq R from the checkpoint, resends busy's
    samples from R+1 on, as a real client must after a rollback. In the end every seq must have
    been applied exactly once, in order: every prediction, and those of fresh samples after it
    all, equal feeding the whole series offline.
    """
    steady, busy = unique("steady"), unique("busy")
    n_steady, n_busy, n_fresh = 170, 2000, 20
    xs = {steady: samples(rng, n_steady), busy: samples(rng, n_busy)}
    expected = {sid: offline_predictions(DEFAULT_MODEL, x) for sid, x in xs.items()}
    state_dir = tmp_path / "state"
    checkpoint = state_dir / "state.npz"
    args = (
        "--mqtt-client-id", unique("edgeseq-crash"),
        "--state-dir", str(state_dir),
        "--checkpoint-interval", "1s",
    )  # fmt: skip

    def send(client: Mqtt, sid: str, seqs: range) -> list[mqtt.MQTTMessageInfo]:
        return [client.publish(f"edgeseq/{sid}/in", sample(xs[sid], s, sid)) for s in seqs]

    with mqtt_client(mqtt_broker, "edgeseq/+/out", "edgeseq/status") as client:
        # 1. Both streams serve; steady's last answer reaches a checkpoint.
        with start_daemon(mqtt_broker, *args) as first:
            wait_online(first, client)
            flush(send(client, steady, range(100)) + send(client, busy, range(100)))
            client.wait(
                lambda m: (
                    len(answered_seqs(m, steady)) == 100 and len(answered_seqs(m, busy)) == 100
                ),
                30,
                "the first 100 answers of each stream",
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if checkpoint.exists() and _checkpoint_seqs(checkpoint).get(steady) == 99:
                    break
                time.sleep(0.02)
            assert _checkpoint_seqs(checkpoint).get(steady) == 99, "no checkpoint of seq 99"

            # 2. busy streams on, one sample every 2 ms, until 20 samples after the crash ...
            paced: list[mqtt.MQTTMessageInfo] = []
            killed = threading.Event()

            def publish_paced() -> None:
                after_kill = 0
                for seq in range(100, n_busy - n_fresh):
                    paced.extend(send(client, busy, range(seq, seq + 1)))
                    after_kill += killed.is_set()
                    if after_kill == 20:
                        return
                    time.sleep(0.002)

            publisher = threading.Thread(target=publish_paced, daemon=True)
            publisher.start()
            client.wait(lambda m: max(answered_seqs(m, busy)) >= 150, 10, "busy's seq 150")
            # ... and the daemon dies 50 ms after a checkpoint, with answers given since.
            seen = _file_id(checkpoint)
            deadline = time.monotonic() + 5
            while _file_id(checkpoint) == seen and time.monotonic() < deadline:
                time.sleep(0.002)
            assert _file_id(checkpoint) != seen, "no checkpoint within 5 s"
            # Kill only once answers beyond that checkpoint have reached us (the next one is
            # a whole interval away; a fixed sleep was too short on a slow CI host).
            checkpointed = _checkpoint_seqs(checkpoint)[busy]
            client.wait(
                lambda m: max(answered_seqs(m, busy)) >= checkpointed + 3,
                10,
                f"busy's answers beyond the checkpoint's seq {checkpointed}",
            )
            first.kill9()
            killed.set()

        # 3. While it is down: the rest of busy's samples, and more of steady's.
        publisher.join(10)
        last = 99 + len(paced)  # busy's last seq sent
        flush(paced + send(client, steady, range(100, 150)))
        time.sleep(0.3)  # answers already on their way to us
        before = client.snapshot()
        restored = _checkpoint_seqs(checkpoint)
        r_busy = restored[busy]
        a_busy = max(a["seq"] for a in predictions(answers_of(before, busy)))
        assert restored[steady] == 99
        assert r_busy < a_busy, "the crash must come after answers the checkpoint lacks"

        # 4. Restart: the broker delivers what it held for the session (at once: answers may
        # come before the daemon's "online").
        mark = len(before)
        with start_daemon(mqtt_broker, *args) as second:
            second.wait_for("states restored", timeout=30)
            wait_online(second, client)
            held = set(range(a_busy + 1, last + 1))
            client.wait(
                lambda m: (
                    held <= answered_seqs(m[mark:], busy)
                    and set(range(100, 150)) <= answered_seqs(m[mark:], steady)
                ),
                30,
                "answers to every sample the broker held for the daemon",
            )
            # The client resends busy from the restored seq on (it may learn R from a stale
            # answer, or from the checkpoint as here), then everyone carries on.
            mark = len(client.snapshot())
            flush(send(client, busy, range(r_busy + 1, last + 1)))
            client.wait(
                lambda m: set(range(r_busy + 1, last + 1)) <= answered_seqs(m[mark:], busy),
                30,
                "answers to the resent samples",
            )
            mark = len(client.snapshot())
            fresh_seqs = range(last + 1, last + 1 + n_fresh)
            flush(send(client, busy, fresh_seqs) + send(client, steady, range(150, n_steady)))
            messages = client.wait(
                lambda m: (
                    set(fresh_seqs) <= answered_seqs(m[mark:], busy)
                    and set(range(150, n_steady)) <= answered_seqs(m[mark:], steady)
                ),
                30,
                "answers to fresh samples",
            )
            after_restart = messages[mark:]
            assert second.stop() == 0

    story = f"busy was restored to seq {r_busy} but had answered up to seq {a_busy} before kill -9"
    for sid, n in ((steady, n_steady), (busy, fresh_seqs.stop)):
        applied = predictions(answers_of(messages, sid))
        assert {a["seq"] for a in applied} == set(range(n)), f"{sid}: a seq was never applied"
    # The state after it all: fresh samples are predicted as if each seq was applied once.
    # (right after it: the model's memory fades within ~100 samples)
    gap = worst_gap(predictions(answers_of(after_restart, busy)), expected[busy])
    assert gap <= TOLERANCE, (
        f"{story}; the predictions of the fresh samples {fresh_seqs.start}..{fresh_seqs.stop - 1}"
        f" differ from offline by {gap:.3g}: the stream's state skipped samples"
    )
    # And every prediction ever given equals offline: none was made from a rolled-back state.
    wrong = mismatches(answers_of(messages, busy), expected[busy])
    assert not wrong, f"{story}; predictions of seqs {wrong[:10]}... differ from offline"
    assert not mismatches(answers_of(messages, steady), expected[steady])


def test_the_retained_status_is_online_while_serving_and_offline_after_sigterm(
    mqtt_broker: Broker,
) -> None:
    with mqtt_client(mqtt_broker, "edgeseq/status") as watcher:
        with start_daemon(mqtt_broker, "--mqtt-client-id", unique("edgeseq-status")) as daemon:
            wait_online(daemon, watcher)
            pid = daemon.proc.pid
            with mqtt_client(mqtt_broker, "edgeseq/status") as late:  # subscribes after
                (online,) = late.wait(lambda m: len(m) >= 1, 10, "the retained status")
            assert online.retain and is_status(online, "edgeseq/status", pid, "online")
            assert isinstance(online.payload["model"], str) and online.payload["model"]
            assert daemon.stop() == 0
        watcher.wait(
            lambda m: any(is_status(x, "edgeseq/status", pid, "offline") for x in m),
            10,
            "offline after SIGTERM",
        )
        with mqtt_client(mqtt_broker, "edgeseq/status") as late:
            (offline,) = late.wait(lambda m: len(m) >= 1, 10, "the retained status")
        assert offline.retain and is_status(offline, "edgeseq/status", pid, "offline")


def test_the_last_will_marks_the_daemon_offline_when_it_is_killed(mqtt_broker: Broker) -> None:
    """kill -9 closes the daemon's socket; the broker sees the connection end without a
    DISCONNECT and publishes the will at once (the keepalive only matters when the network,
    not the process, goes away; 45 s covers 1.5 x its 30 s)."""
    status = f"{unique('will')}/status"
    with mqtt_client(mqtt_broker, status) as watcher:
        with start_daemon(
            mqtt_broker, "--mqtt-client-id", unique("edgeseq-will"), "--mqtt-status", status
        ) as daemon:
            wait_online(daemon, watcher, status)
            pid = daemon.proc.pid
            daemon.kill9()
        watcher.wait(
            lambda m: any(is_status(x, status, pid, "offline") for x in m), 45, "the last will"
        )
        with mqtt_client(mqtt_broker, status) as late:
            (will,) = late.wait(lambda m: len(m) >= 1, 10, "the retained status")
        assert will.retain and is_status(will, status, pid, "offline")


def test_bad_payloads_get_error_answers_while_other_streams_carry_on(
    mqtt_broker: Broker, rng: np.random.Generator
) -> None:
    good, other, n_steps = unique("good"), unique("other"), 40
    xs = {good: samples(rng, n_steps), other: samples(rng, n_steps)}
    bad = {code: unique(f"bad-{code}") for code in ("json", "features", "nan", "mismatch", "list")}
    payloads: dict[str, bytes] = {
        bad["json"]: b'{"seq": 0, "x": [1, 2',
        bad["features"]: json.dumps({"seq": 0, "x": [1.0, 2.0]}).encode(),
        bad["nan"]: b'{"seq": 0, "x": [NaN, 0.0, 1.0]}',
        bad["mismatch"]: json.dumps({"id": "someone-else", "seq": 0, "x": [0, 0, 0]}).encode(),
        bad["list"]: b"[1, 2, 3]",
    }
    with (
        mqtt_client(mqtt_broker, "edgeseq/+/out", "edgeseq/status") as client,
        start_daemon(mqtt_broker, "--mqtt-client-id", unique("edgeseq-bad")) as daemon,
    ):
        wait_online(daemon, client)
        infos = []
        for seq in range(n_steps):
            for sid in (good, other):
                if sid == good and seq == 20:  # a bad message mid-stream touches nothing
                    wrong = {"id": good, "seq": 20, "x": [1.0, 2.0, 3.0, 4.0]}
                    infos.append(client.publish(f"edgeseq/{good}/in", wrong))
                infos.append(client.publish(f"edgeseq/{sid}/in", sample(xs[sid], seq)))
            if seq == 10:
                for sid, payload in payloads.items():
                    infos.append(client.publish(f"edgeseq/{sid}/in", payload))
        flush(infos)
        messages = client.wait(
            lambda m: (
                len(answers_of(m, good)) == n_steps + 1
                and len(answers_of(m, other)) == n_steps
                and all(answers_of(m, sid) for sid in bad.values())
            ),
            30,
            "every answer",
        )
        assert daemon.stop() == 0

    def code_of(sid: str) -> tuple[Any, Any, str]:
        (answer,) = answers_of(messages, sid)
        return answer["id"], answer["seq"], answer["error"]["code"]

    assert code_of(bad["json"]) == (bad["json"], None, "bad_json")
    assert code_of(bad["features"]) == (bad["features"], 0, "wrong_features")
    assert code_of(bad["nan"]) == (bad["nan"], 0, "not_finite")
    assert code_of(bad["mismatch"]) == (bad["mismatch"], 0, "id_mismatch")
    assert code_of(bad["list"]) == (bad["list"], None, "bad_json")
    errors = [a for a in answers_of(messages, good) if "error" in a]
    assert [(a["seq"], a["error"]["code"]) for a in errors] == [(20, "wrong_features")]
    for sid in (good, other):
        applied = predictions(answers_of(messages, sid))
        assert [a["seq"] for a in applied] == list(range(n_steps))
        assert worst_gap(applied, offline_predictions(DEFAULT_MODEL, xs[sid])) <= TOLERANCE


def test_custom_topics_carry_samples_and_answers(
    mqtt_broker: Broker, rng: np.random.Generator
) -> None:
    plant = unique("plant")
    ids, n_steps = [unique("line-a"), unique("line-b")], 50
    xs = {sid: samples(rng, n_steps) for sid in ids}
    out = f"{plant}/{{id}}/predictions"
    status = f"{plant}/status"
    with (
        mqtt_client(mqtt_broker, f"{plant}/+/predictions", "edgeseq/+/out", status) as client,
        start_daemon(
            mqtt_broker,
            "--mqtt-client-id", unique("edgeseq-plant"),
            "--mqtt-in", f"{plant}/+/samples",
            "--mqtt-out", out,
            "--mqtt-status", status,
        ) as daemon,
    ):  # fmt: skip
        wait_online(daemon, client, status)
        infos = [client.publish(f"edgeseq/{ids[0]}/in", sample(xs[ids[0]], 0, ids[0]))]
        for seq in range(n_steps):
            for sid in ids:
                infos.append(client.publish(f"{plant}/{sid}/samples", sample(xs[sid], seq)))
        flush(infos)
        messages = client.wait(
            lambda m: all(len(answers_of(m, sid, out)) == n_steps for sid in ids),
            30,
            "the answers on the custom topic",
        )
        assert daemon.stop() == 0
    for sid in ids:
        answers = answers_of(messages, sid, out)
        assert [a["seq"] for a in predictions(answers)] == list(range(n_steps))
        assert all(a["id"] == sid for a in answers)
        assert worst_gap(predictions(answers), offline_predictions(DEFAULT_MODEL, xs[sid])) <= (
            TOLERANCE
        )
    assert not [m for m in messages if m.topic.startswith("edgeseq/")], "default topics unused"


def test_a_daemon_restarted_with_other_topics_does_not_serve_its_old_ones(
    mqtt_broker: Broker, rng: np.random.Generator
) -> None:
    """The session is persistent, so the broker keeps the old subscription of a daemon that
    comes back with another --mqtt-in under the same client id; a sample on the old topic is
    not one of the new topic's streams, and must not become one (under a mangled id)."""
    plant, sid = unique("moved"), unique("line")
    xs = samples(rng, 5)
    client_id = ("--mqtt-client-id", unique("edgeseq-moved"))
    with mqtt_client(mqtt_broker, f"{plant}/#", "edgeseq/+/out", "edgeseq/status") as client:
        with start_daemon(mqtt_broker, *client_id) as old:
            wait_online(old, client)
            assert old.stop() == 0
        with start_daemon(
            mqtt_broker, *client_id, "--mqtt-in", f"{plant}/+/samples",
            "--mqtt-out", f"{plant}/{{id}}/predictions",
        ) as new:  # fmt: skip
            wait_online(new, client)
            old_topic = f"edgeseq/{unique('pump')}/in"
            flush([client.publish(old_topic, {"seq": 0, "x": [0.0, 0.0, 0.0]})])
            flush([client.publish(f"{plant}/{sid}/samples", sample(xs, s)) for s in range(5)])
            messages = client.wait(
                lambda m: len(answers_of(m, sid, f"{plant}/{{id}}/predictions")) == 5,
                30,
                "the answers on the new topic",
            )
            messages = wait_quiet(client, lambda m: False, 0.5, 5)
            assert new.stop() == 0
    answer_topics = {m.topic for m in messages if m.topic.endswith(("/predictions", "/out"))}
    mine = f"{plant}/{sid}/predictions"
    strays = [(m.topic, m.payload) for m in messages if m.topic in answer_topics - {mine}]
    assert not strays, f"a sample on the old topic {old_topic} was served: {strays}"


class LaggyLink:
    """A TCP proxy to the broker that delays what the broker sends by `delay` seconds, as a
    broker far away would (what the client sends passes at once)."""

    def __init__(self, broker: Broker, delay: float) -> None:
        self.broker, self.delay = broker, delay
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.server.accept()
                far = socket.create_connection(self.broker)
            except OSError:
                return
            self.sockets += [near, far]
            lagging: queue.Queue[tuple[float, bytes] | None] = queue.Queue()
            for target, args in (
                (self._forward, (near, far)),
                (self._hold, (far, lagging)),
                (self._release, (lagging, near)),
            ):
                threading.Thread(target=target, args=args, daemon=True).start()

    @staticmethod
    def _forward(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (sink, source):  # the broker sees the connection end when the client's does
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _hold(
        self, source: socket.socket, lagging: queue.Queue[tuple[float, bytes] | None]
    ) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                lagging.put((time.monotonic() + self.delay, data))
        lagging.put(None)

    @staticmethod
    def _release(lagging: queue.Queue[tuple[float, bytes] | None], sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while (item := lagging.get()) is not None:
                due, data = item
                time.sleep(max(0.0, due - time.monotonic()))
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def test_no_acknowledged_sample_is_lost_when_the_daemon_is_killed_mid_burst(
    mqtt_broker: Broker, rng: np.random.Generator
) -> None:
    """QoS 1 end to end: the daemon acknowledges a sample only once it has answered it, so when
    it dies every sample is either answered or redelivered to the restarted daemon (which,
    without a state dir, answers it from a fresh state: only the answer counts here). The
    first daemon talks to the broker over a link with 50 ms of latency, so its answers wait for
    the broker's acknowledgements while samples keep arriving."""
    ids, n_steps = [unique(f"burst-{i:02d}") for i in range(20)], 100
    xs = {sid: samples(rng, n_steps) for sid in ids}
    client_id = ("--mqtt-client-id", unique("edgeseq-burst"))
    everything = {(sid, seq) for sid in ids for seq in range(n_steps)}

    def answered(messages: list[Received]) -> set[tuple[str, int]]:
        return {(sid, seq) for sid in ids for seq in answered_seqs(messages, sid)}

    link = LaggyLink(mqtt_broker, 0.05)
    try:
        with mqtt_client(mqtt_broker, "edgeseq/+/out", "edgeseq/status") as client:
            with start_daemon(("127.0.0.1", link.port), *client_id) as first:
                wait_online(first, client)
                infos = [
                    client.publish(f"edgeseq/{sid}/in", sample(xs[sid], seq, sid))
                    for seq in range(n_steps)
                    for sid in ids
                ]
                flush(infos)
                client.wait(lambda m: len(answered(m)) >= 50, 30, "the first 50 answers")
                first.kill9()
            with start_daemon(mqtt_broker, *client_id) as second:
                wait_online(second, client)
                messages = wait_quiet(client, lambda m: answered(m) >= everything, 2.0, 30)
                assert second.stop() == 0
    finally:
        link.close()
    lost = sorted(everything - answered(messages))
    assert not lost, (
        f"{len(lost)} of {len(everything)} samples (e.g. {lost[:3]}) were neither answered nor "
        "redelivered after kill -9: the daemon acknowledged them before their answers were sent"
    )


def test_without_its_broker_the_daemon_waits_saying_so_and_is_ready_once_subscribed(tmp_path):
    """`serve --mqtt` to a broker that is not up says it waits for it, says "ready" only once
    subscribed to it, and the moment the broker comes up (paho's reconnect) it is."""
    from edgeseq.bench.loadgen.broker import ensure_mosquitto, free_port, stop_broker, write_config

    binary = ensure_mosquitto(clients=False)
    port = free_port()
    broker = None
    try:
        with DaemonProcess(MODEL, "--mqtt", f"mqtt://127.0.0.1:{port}",
                           "--mqtt-client-id", unique("edgeseq-waits")) as daemon:  # fmt: skip
            daemon.wait_for(f"waiting for the MQTT broker at 127.0.0.1:{port}")
            time.sleep(1.0)
            assert not any(entry.get("event") == "ready" for entry in daemon.logs), daemon.logs
            conf = write_config(tmp_path, port)
            with open(tmp_path / "mosquitto.log", "ab") as log:
                broker = subprocess.Popen([binary, "-c", str(conf)], stdout=log,
                                          stderr=subprocess.STDOUT, cwd=tmp_path)  # fmt: skip
            daemon.wait_for("ready", timeout=90)
            assert daemon.stop() == 0
    finally:
        if broker is not None:
            stop_broker(broker)
