"""The daemon's pieces in-process: wire-format checks, config, line splitting, the stream table's
seq rules and the batcher's rounds. The subprocess tests (test_daemon_*.py) run the whole."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgeseq
from edgeseq.daemon.batcher import TOO_LONG, Parcel, Refused, _rounds
from edgeseq.daemon.lines import LineSplitter
from edgeseq.daemon.options import build_config, parse_duration
from edgeseq.daemon.protocol import BadMessage, Sample, encode, parse_csv, parse_json
from edgeseq.daemon.table import StreamTable
from edgeseq.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "export" / "pump-lstm.onnx"


def _code(line: bytes, n_features: int = 3, limit: int = 1000) -> str:
    with pytest.raises(BadMessage) as caught:
        parse_json(line, n_features, limit)
    return caught.value.code


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json", "bad_json"),
        (b"[1, 2, 3]", "bad_json"),
        (b'{"seq": 1, "x": [1, 2, 3]}', "missing_id"),
        (b'{"id": 7, "x": [1, 2, 3]}', "bad_id"),
        (b'{"id": "", "x": [1, 2, 3]}', "bad_id"),
        (b'{"id": "a", "seq": -1, "x": [1, 2, 3]}', "bad_seq"),
        (b'{"id": "a", "seq": true, "x": [1, 2, 3]}', "bad_seq"),
        (b'{"id": "a", "seq": 1.5, "x": [1, 2, 3]}', "bad_seq"),
        (b'{"id": "a", "x": [1, 2]}', "wrong_features"),
        (b'{"id": "a", "x": "1,2,3"}', "bad_x"),
        (b'{"id": "a", "x": [1, "2", 3]}', "bad_x"),
        (b'{"id": "a", "x": [1, NaN, 3]}', "not_finite"),
        (b'{"id": "a", "x": [1, Infinity, 3]}', "not_finite"),
        (b'{"id": "a", "x": [1, 1e999, 3]}', "not_finite"),
        (b'{"id": "a", "x": [1, 2, 3], "reset": "yes"}', "bad_control"),
        (b'{"id": "a", "x": [1, 2, 3], "end": 1}', "bad_control"),
        (b'{"id": "a", "x": [1, 2, 3], "rest": true}', "unknown_field"),
        (b'{"id": "a", "seq": 1}', "missing_x"),
        (b"[" * 100_000, "bad_json"),
    ],
)
def test_every_malformed_message_gets_its_own_error_code(line, code):
    assert _code(line, limit=200_000) == code


def test_a_line_over_the_limit_is_refused_before_it_is_parsed():
    assert _code(b'{"id": "a", "x": [1, 2, 3]}' + b" " * 2000) == "too_long"


def test_an_error_names_the_stream_and_seq_when_they_are_known():
    with pytest.raises(BadMessage) as caught:
        parse_json(b'{"id": "pump-7", "seq": 4, "x": [1, 2]}', 3, 1000)
    assert (caught.value.stream_id, caught.value.seq) == ("pump-7", 4)
    assert "3" in caught.value.message and "2 values" in caught.value.message


def test_a_valid_message_parses_with_its_controls():
    sample = parse_json(b'{"id": "a", "seq": 3, "x": [1, 2.5, -3], "reset": true}', 3, 1000)
    assert sample == Sample("a", 3, [1.0, 2.5, -3.0], reset=True, end=False)
    bare_end = parse_json(b'{"id": "a", "seq": 4, "end": true}', 3, 1000)
    assert bare_end.x is None and bare_end.end


def test_csv_lines_parse_to_the_same_samples_and_refuse_the_same_way():
    assert parse_csv(b"pump-1,5,0.1,0.2,0.3\n", 3, 1000) == Sample("pump-1", 5, [0.1, 0.2, 0.3])
    assert parse_csv(b"pump-1,,0.1,0.2,0.3", 3, 1000).seq is None
    for line, code in [(b"pump-1,5,0.1,zz,0.3", "bad_x"), (b"pump-1,5,0.1", "wrong_features"),
                       (b",5,1,2,3", "missing_id"), (b"p,x,1,2,3", "bad_seq"),
                       (b"p,1,1,nan,3", "not_finite")]:  # fmt: skip
        with pytest.raises(BadMessage) as caught:
            parse_csv(line, 3, 1000)
        assert caught.value.code == code, line


def test_the_line_splitter_reports_an_overlong_line_once_and_keeps_the_next():
    split = LineSplitter(limit=10)
    assert split.push(b"short\n" + b"x" * 25) == [b"short", TOO_LONG]
    assert split.push(b"y" * 30) == []  # still the same over-long line
    assert split.push(b"zz\nnext\n  \nlast") == [b"next"]  # a blank line gets no answer
    assert split.finish() == [b"last"]
    assert split.push(b"ok\n" + b"w" * 11 + b"\nend\n") == [b"ok", TOO_LONG, b"end"]
    crlf = b"c" * 10 + b"\r"  # at the limit: its CR belongs to the line ending
    assert split.push(crlf + b"\n" + b"c" * 11 + b"\r\n") == [crlf, TOO_LONG]
    assert split.push(b"d" * 10) == [] and split.push(b"\r\n") == [b"d" * 10 + b"\r"]


def test_durations_take_units_and_refuse_nonsense():
    assert parse_duration("10m", "t") == 600
    assert parse_duration("500ms", "t") == pytest.approx(0.5)
    assert parse_duration(2, "t") == 2.0
    for bad in ("soon", "-1s", "10 parsecs", True):
        with pytest.raises(UsageError, match="duration"):
            parse_duration(bad, "t")


def test_a_config_file_is_validated_and_the_command_line_wins(tmp_path):
    conf = tmp_path / "serve.toml"
    conf.write_text('model = "m.onnx"\nmax-streams = 5\nidle_timeout = "2m"\n')
    config = build_config(conf, {"max_streams": 7, "listen": None})
    assert (config.max_streams, config.idle_timeout, config.model) == (7, 120.0, "m.onnx")
    for text, expected in [('model = "m"\nmax_streams = "many"', "max_streams"),
                           ('model = "m"\nmax_stream = 5', "unknown setting 'max_stream'"),
                           ('model = "m"\nlisten = "udp://x:1"', "tcp://HOST:PORT"),
                           ('model = "m"\nmqtt_out = "out"', "{id}"),
                           ("model = [", "not valid TOML")]:  # fmt: skip
        conf.write_text(text)
        with pytest.raises(UsageError, match=expected.replace("{", r"\{").replace("(", r"\(")):
            build_config(conf, {})


def _sample(sid: str, seq: int) -> Sample:
    return Sample(sid, seq, [0.0, 0.0, 0.0])


def test_rounds_keep_each_streams_samples_in_arrival_order_across_parcels():
    sink = None  # rounds never touch the sink
    first = Parcel(sink, [_sample("a", 1), _sample("b", 1), _sample("a", 2)])  # type: ignore[arg-type]
    second = Parcel(sink, [_sample("a", 3), Refused("b", {}), _sample("c", 1), Refused(None, {})])  # type: ignore[arg-type]
    rounds = [[(b, k, e.stream_id) for b, k, e in r] for r in _rounds([first, second])]
    assert rounds == [
        [(0, 0, "a"), (0, 1, "b"), (1, 2, "c"), (1, 3, None)],
        [(0, 2, "a"), (1, 1, "b")],
        [(1, 0, "a")],
    ]


def test_the_table_applies_each_seq_once_answers_duplicates_and_refuses_stale():
    model = edgeseq.load(MODEL)
    table = StreamTable(model, capacity=4)
    xs = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    expected = model.stream().feed(xs)[:, 0]
    got = [table.apply([Sample("a", i, xs[i].tolist())])[0] for i in range(3)]
    duplicate = table.apply([Sample("a", 2, xs[2].tolist())])[0]
    stale = table.apply([Sample("a", 1, xs[1].tolist())])[0]
    rest = [table.apply([Sample("a", i, xs[i].tolist())])[0] for i in (3, 4)]
    assert duplicate == {**got[2], "duplicate": True}
    assert stale["error"]["code"] == "stale"
    ys = [answer["y"][0] for answer in got + rest]
    np.testing.assert_allclose(ys, expected, atol=1e-6)
    assert table.counters.applied == 5 and table.counters.duplicates == 1


def test_a_full_table_refuses_new_streams_and_keeps_serving_the_old():
    model = edgeseq.load(MODEL)
    table = StreamTable(model, capacity=2)
    x = [0.1, 0.2, 0.3]
    answers = table.apply([Sample("a", 0, x), Sample("b", 0, x), Sample("c", 0, x)])
    assert [("error" in a) for a in answers] == [False, False, True]
    assert answers[2]["error"]["code"] == "capacity"
    assert "y" in table.apply([Sample("a", 1, x)])[0]
    table.apply([Sample("b", 1, x, end=True)])
    assert "y" in table.apply([Sample("c", 0, x)])[0]  # room again after an end


def test_idle_streams_expire_and_are_counted():
    table = StreamTable(edgeseq.load(MODEL), capacity=4)
    table.apply([Sample("a", 0, [0.1, 0.2, 0.3])])
    assert table.expire(idle_timeout=3600) == []
    assert table.expire(idle_timeout=0.0) == ["a"]
    assert len(table) == 0 and table.counters.evictions["idle"] == 1


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_the_shipped_unit_file_passes_systemd_analyze_verify():
    proc = subprocess.run(["systemd-analyze", "verify", str(ROOT / "devices" / "edgeseq.service")],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    problems = [line for line in proc.stderr.splitlines() if "is not executable" not in line]
    assert problems == [], proc.stderr  # the binary lives on the board, not here


def test_addresses_default_to_loopback_and_the_mqtt_port():
    from edgeseq.daemon.options import parse_address

    assert parse_address("tcp://:7878", "listen", "tcp") == ("127.0.0.1", 7878)
    assert parse_address("mqtt://broker.local", "mqtt", "mqtt") == ("broker.local", 1883)
    assert parse_address(":9108", "metrics", None) == ("127.0.0.1", 9108)
    assert parse_address("tcp://0.0.0.0:1", "listen", "tcp") == ("0.0.0.0", 1)
    for bad in ("tcp://host", "tcp://host:1/path", "udp://host:1", "tcp://host:port"):
        with pytest.raises(UsageError, match="HOST:PORT"):
            parse_address(bad, "listen", "tcp")


def test_a_one_feature_model_takes_a_bare_number_and_a_csv_header_is_recognised():
    from edgeseq.daemon.protocol import is_csv_header

    assert parse_json(b'{"id": "a", "x": 0.5}', 1, 1000).x == [0.5]
    assert _code(b'{"id": "a", "x": 0.5}', n_features=3) == "bad_x"
    assert is_csv_header(b"id,seq,x1,x2,x3") and is_csv_header(b"ID, Seq, a")
    assert not is_csv_header(b"pump-1,1,0.1,0.2,0.3")


def test_stdin_csv_skips_a_header_row_and_answers_every_sample():
    proc = subprocess.run(
        [sys.executable, "-m", "edgeseq", "serve", str(MODEL), "--format", "csv"],
        input="id,seq,x1,x2,x3\np1,0,0.1,0.2,0.3\np1,1,0.1,0.2,0.3\n",
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [a["seq"] for a in answers] == [0, 1] and all("y" in a for a in answers)


def test_a_sample_that_overflows_the_model_is_refused_and_its_stream_state_kept():
    model = edgeseq.load(MODEL)
    table = StreamTable(model, capacity=4)
    xs = np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32)
    expected = model.stream().feed(xs)[:, 0]
    assert table.apply([Sample("a", 0, xs[0].tolist())])[0]["y"][0] == pytest.approx(expected[0])
    huge = [3e38, 3e38, 3e38]  # finite in float32, NaN inside the model: would poison the state
    refused = table.apply([Sample("a", 1, huge), Sample("new", 0, huge)])
    assert [r["error"]["code"] for r in refused] == ["bad_output", "bad_output"]
    assert "unchanged" in refused[0]["error"]["message"]
    got = [table.apply([Sample("a", i, xs[i].tolist())])[0]["y"][0] for i in (1, 2, 3)]
    np.testing.assert_allclose(got, expected[1:], atol=1e-6)
    fresh = table.apply([Sample("new", 1, xs[0].tolist())])[0]
    assert fresh["y"][0] == pytest.approx(expected[0], abs=1e-6)


def test_an_answer_holding_a_lone_surrogate_is_written_as_escaped_json():
    """orjson refuses to write one; the answer must still go out, as valid ASCII JSON."""
    answer = {"id": None, "error": {"code": "bad_x", "message": "found '\ud800'"}}
    line = encode(answer)
    assert line.endswith(b"\n") and line.isascii()
    assert json.loads(line) == answer


def test_an_unknown_stream_starts_only_at_its_beginning_else_it_is_asked_to_resend_from_0():
    """After a crash, a stream that began after the last checkpoint is unknown: its seq 9 on a
    zero state would be silently wrong."""
    table = StreamTable(edgeseq.load(MODEL), capacity=8)
    x = [0.1, 0.2, 0.3]
    refused = table.apply([Sample("late", 9, x)])[0]
    assert refused["error"]["code"] == "resend" and refused["error"]["resend_from"] == 0
    assert "late" not in table.info  # nothing was started
    begun = table.apply([Sample("a", 0, x), Sample("b", 7, x, reset=True), Sample("c", None, x)])
    assert all("y" in answer for answer in begun)
    assert "y" in table.apply([Sample("late", 0, x)])[0]
    assert parse_json(b'{"id": "d", "seq": 5, "x": [1, 2, 3], "start": true}', 3, 999).start


def test_start_begins_a_known_stream_anew_with_its_numbering_and_reset_keeps_the_numbering():
    """A device that rebooted starts its stream over at seq 0 with "start"."""
    model = edgeseq.load(MODEL)
    table = StreamTable(model, capacity=4)
    table.durable = True
    xs = np.random.default_rng(5).normal(size=(6, 3)).astype(np.float32)
    for t in range(4):
        table.apply([Sample("a", t, xs[t].tolist())])
    assert table.apply([Sample("a", 0, xs[4].tolist())])[0]["error"]["code"] == "stale"
    table.made_durable({"seq": {"a": 3}}, dict(table.info))
    begun = table.apply([Sample("a", 0, xs[4].tolist(), start=True)])[0]
    fresh = model.stream().feed(xs[4:6])[:, 0]
    assert begun["y"][0] == pytest.approx(fresh[0], abs=1e-6) and begun["durable"] is None
    assert table.apply([Sample("a", 1, xs[5].tolist())])[0]["y"][0] == pytest.approx(fresh[1])
    refused = table.apply([Sample("a", 0, xs[4].tolist(), reset=True)])[0]
    assert refused["error"]["code"] == "stale"  # reset zeroes the state, not the numbering


def test_answers_carry_the_seq_of_the_last_completed_checkpoint_of_this_stream_only():
    table = StreamTable(edgeseq.load(MODEL), capacity=8)
    table.durable = True
    x = [0.1, 0.2, 0.3]
    assert table.apply([Sample("a", 0, x)])[0]["durable"] is None
    _, extra = table.snapshot()
    infos = dict(table.info)
    table.apply([Sample("a", 1, x)])
    table.made_durable(extra, infos)  # the snapshot of seq 0 is on disk now
    assert table.apply([Sample("a", 2, x)])[0]["durable"] == 0
    assert table.apply([Sample("a", 2, x)])[0]["durable"] == 0  # a duplicate says it too
    _, extra = table.snapshot()
    infos = dict(table.info)
    table.apply([Sample("a", 3, x, end=True)])
    assert table.apply([Sample("a", 0, x)])[0]["durable"] is None  # a new incarnation
    table.made_durable(extra, infos)  # of the ended stream: says nothing of the new one
    assert table.apply([Sample("a", 1, x)])[0]["durable"] is None


@pytest.mark.parametrize(
    "line",
    [
        b'{"id": "a", "seq": 1, "x": ' + b"[" * 1000 + b"]" * 1000 + b"}",
        b'{"id": "a", "seq": 1, "x": [1, 2, ' + b"[" * 1000 + b"]" * 1000 + b"]}",
        b'{"id": "a", "seq": ' + b"[" * 1000 + b"]" * 1000 + b', "x": [1, 2, 3]}',
        b'{"id": ' + b"{" * 500 + b"}" * 500 + b"}",
        b"[" * 1020 + b"]" * 1020,
        b"[" * 5000 + b"]" * 5000,
    ],
)
def test_deeply_nested_values_are_refused_with_an_error_that_names_them(line: bytes) -> None:
    """A RecursionError while describing such a value used to kill the connection's handler."""
    with pytest.raises(BadMessage) as caught:
        parse_json(line, 3, 1 << 20)
    assert caught.value.code in ("bad_x", "wrong_features", "bad_seq", "bad_id", "bad_json")
    assert len(caught.value.message) < 300


def test_the_fast_path_reads_every_message_as_the_full_checks_do():
    """The common-message shortcut must agree with sample_from_object on what it accepts."""
    from edgeseq.daemon.protocol import sample_from_object

    rng = np.random.default_rng(7)
    values = [0, 1, -1, 0.5, 3.4e38, -3.4e38, 3.5e38, 1e39, True, None, "1", [1], 2**70, -0.0]
    for _ in range(3000):
        message = {
            "id": rng.choice(["a", "", "x" * 257, "ok-id"]),
            "seq": rng.choice([0, 5, -1, 1.5, "3", True, None], p=[0.4, 0.3] + [0.06] * 5),
            "x": [values[i] for i in rng.integers(0, len(values), rng.integers(2, 5))],
        }
        line = json.dumps(message).encode()
        try:
            expected: object = sample_from_object(json.loads(line), 3)
        except BadMessage as bad:
            expected = bad.code
        try:
            got: object = parse_json(line, 3, 10_000)
        except BadMessage as bad:
            got = bad.code
        if isinstance(expected, Sample) and isinstance(got, Sample):
            assert (got.stream_id, got.seq, got.reset, got.end) == (
                expected.stream_id, expected.seq, expected.reset, expected.end
            )  # fmt: skip
            assert [float(v) for v in got.x or []] == expected.x
        else:
            assert got == expected, line


def test_the_buffered_socket_serves_pahos_small_reads_from_one_and_sends_its_packets_in_one():
    import socket

    from edgeseq.daemon.transports.paho_asyncio import BufferedSocket

    mine, theirs = socket.socketpair()
    mine.setblocking(False)
    wrapped = BufferedSocket(mine)
    try:
        theirs.sendall(b"\x30\x05hello" + b"\x30\x02hi")
        assert (wrapped.recv(1), wrapped.recv(1), wrapped.recv(5)) == (b"\x30", b"\x05", b"hello")
        assert wrapped.buffered == 4  # read ahead: no more system calls for these
        assert wrapped.recv(10) == b"\x30\x02hi" and wrapped.buffered == 0
        with pytest.raises(BlockingIOError):
            wrapped.recv(1)  # drained: paho sees EAGAIN as from the socket itself
        assert wrapped.fileno() == mine.fileno()
        assert wrapped.send(b"\x40\x02\x00\x01") == 4 and wrapped.send(b"\xe0\x00") == 2
        assert wrapped.unsent == 6  # gathered, not yet on the wire
        assert wrapped.flush() and wrapped.unsent == 0
        assert theirs.recv(100) == b"\x40\x02\x00\x01\xe0\x00"
        wrapped.send(b"\xe0\x00")  # a DISCONNECT paho 'sent' just before closing
        wrapped.close()
        assert theirs.recv(100) == b"\xe0\x00"
    finally:
        mine.close()
        theirs.close()


def test_the_lean_puback_handler_acts_as_pahos_own_and_leaves_mqtt_5_and_bad_packets_to_it():
    import paho.mqtt.client as mqtt
    from paho.mqtt.exception import MalformedPacket

    from edgeseq.daemon.transports.paho_asyncio import BufferedClient

    def client_with_one_answer_in_flight(
        kind: type[mqtt.Client], protocol: int = mqtt.MQTTv311
    ) -> tuple[mqtt.Client, list[tuple[int, str]]]:
        client = kind(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
        calls: list[tuple[int, str]] = []
        client.on_publish = lambda c, u, mid, reason, props: calls.append((mid, str(reason)))
        info = client.publish("edgeseq/s/out", b"{}", qos=1)  # not connected: kept in flight
        assert info.mid == 1 and list(client._out_messages) == [1]
        return client, calls

    for kind in (mqtt.Client, BufferedClient):  # paho's own handler, then ours: the same
        client, calls = client_with_one_answer_in_flight(kind)
        client._in_packet["packet"] = b"\x00\x07"  # a PUBACK for an id not in flight
        assert client._handle_pubackcomp("PUBACK") == mqtt.MQTT_ERR_SUCCESS and calls == []
        client._in_packet["packet"] = b"\x00\x01"
        assert client._handle_pubackcomp("PUBACK") == mqtt.MQTT_ERR_SUCCESS
        assert calls == [(1, "Success")] and client._out_messages == {}
        assert client._handle_pubackcomp("PUBACK") == mqtt.MQTT_ERR_SUCCESS  # again: no call
        assert calls == [(1, "Success")], kind
        client._in_packet["packet"] = b"\x00\x01\x00"  # 3 bytes: malformed under 3.1.1
        with pytest.raises(MalformedPacket):  # which paho's reader turns into a disconnect
            client._handle_pubackcomp("PUBACK")
    client, calls = client_with_one_answer_in_flight(BufferedClient, mqtt.MQTTv5)
    client._in_packet["packet"] = b"\x00\x01\x10"  # MQTT 5 reason "no matching subscribers"
    assert client._handle_pubackcomp("PUBACK") == mqtt.MQTT_ERR_SUCCESS
    assert calls == [(1, "No matching subscribers")]  # decoded by paho, reason and all
    with pytest.raises(NotImplementedError):
        client.message_callback_add("edgeseq/+/in", lambda *a: None)


class _FakeBroker:
    """An MqttTransport whose paho client publishes into lists: mids from 1001, rc success."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, unacked_max: int) -> None:
        from edgeseq.daemon.options import DaemonConfig
        from edgeseq.daemon.transports import mqtt as transport

        monkeypatch.setattr(transport, "UNACKED_MAX", unacked_max)

        class Batcher:
            config = DaemonConfig(model="m")

        self.mqtt = transport.MqttTransport(Batcher(), "127.0.0.1", 1883, {})  # type: ignore[arg-type]
        self.published: list[tuple[str, bytes]] = []
        self.acked: list[int] = []
        monkeypatch.setattr(self.mqtt.client, "publish", self._publish)
        monkeypatch.setattr(self.mqtt.client, "ack", lambda mid, qos: self.acked.append(mid))

    def _publish(self, topic: str, body: bytes, qos: int) -> object:
        self.published.append((topic, body))
        return type("Info", (), {"rc": 0, "mid": 1000 + len(self.published)})()

    def broker_acknowledges(self, *mids: int) -> None:
        for mid in mids:
            self.mqtt._on_publish(self.mqtt.client, None, mid, None, None)


def test_mqtt_answers_past_the_in_flight_limit_wait_and_every_sample_is_acked_after_its_answer(
    monkeypatch,
):
    """MQTT's 16-bit message ids: past 65,535 answers in flight paho's would collide."""
    broker = _FakeBroker(monkeypatch, unacked_max=3)
    mqtt = broker.mqtt
    mqtt._online = True  # as after CONNACK
    context = [(f"s{k}", k, 1, 0) for k in range(5)]
    lines = b"".join(b'{"id":"s%d","seq":0,"y":[1.0]}\n' % k for k in range(5))
    mqtt.deliver(Parcel(mqtt, [None] * 5, context=context), lines)  # type: ignore[list-item]
    assert [topic for topic, _ in broker.published] == [
        "edgeseq/s0/out",
        "edgeseq/s1/out",
        "edgeseq/s2/out",
    ]
    assert broker.acked == []  # no sample before the broker has its answer
    broker.broker_acknowledges(1001)  # s0's answer
    assert broker.acked == [0] and len(broker.published) == 4  # s3's answer goes out in its place
    broker.broker_acknowledges(1002, 1003, 1004, 1005)
    assert broker.acked == [0, 1, 2, 3, 4]
    assert broker.published[-1][1] == b'{"id":"s4","seq":0,"y":[1.0]}'


def test_mqtt_answers_to_qos_0_samples_count_in_flight_and_old_connections_samples_are_not_acked(
    monkeypatch,
):
    broker = _FakeBroker(monkeypatch, unacked_max=2)
    mqtt = broker.mqtt
    lines = b"".join(b'{"id":"s","seq":%d,"y":[1.0]}\n' % k for k in range(4))
    mqtt.deliver(Parcel(mqtt, [None] * 4, context=[("s", 0, 0, 0)] * 4), lines)  # type: ignore[list-item]
    assert broker.published == []  # not connected yet: the answers wait
    mqtt._online = True
    mqtt._publish_held()
    assert len(broker.published) == 2  # QoS 0 samples' answers are in flight too (16-bit ids)
    broker.broker_acknowledges(1001, 1002)
    assert len(broker.published) == 4 and broker.acked == []
    mqtt._connection = 1  # the connection dropped and came back: mid 7 was the old one's
    mqtt.deliver(Parcel(mqtt, [None], context=[("s", 7, 1, 0)]), b'{"id":"s","seq":9}\n')  # type: ignore[list-item]
    broker.broker_acknowledges(1005)
    assert broker.acked == []  # the broker redelivers it on this connection, with its own ack


def test_an_mqtt_payload_whose_id_or_seq_is_nested_deep_is_refused_not_raised():
    from edgeseq.daemon.options import DaemonConfig
    from edgeseq.daemon.transports import mqtt as transport

    class Table:
        class model:
            n_features = 3

    class Batcher:
        config = DaemonConfig(model="m")
        table = Table()

    mqtt = transport.MqttTransport(Batcher(), "127.0.0.1", 1883, {})  # type: ignore[arg-type]
    deep = b"[" * 1000 + b"]" * 1000
    for payload in (b'{"id":' + deep + b',"seq":1,"x":[1,2,3]}', b'{"id":"x","seq":' + deep + b"}"):
        with pytest.raises(BadMessage) as caught:
            mqtt._parse("dev", payload)
        assert caught.value.code == "id_mismatch" and caught.value.seq in (1, None)
        assert len(caught.value.message) < 200  # the raw value is never echoed


def test_an_answer_that_cannot_be_encoded_spoils_only_its_own_line():
    from edgeseq.daemon.batcher import _encoded

    deep: object = 1
    for _ in range(1000):
        deep = [deep]
    lines = _encoded([{"id": "a", "seq": 1, "y": [1.0]}, {"id": "b", "seq": deep}, {"id": "c"}])
    first, second, third = (json.loads(line) for line in lines.splitlines())
    assert first["id"] == "a" and second["error"]["code"] == "internal" and third["id"] == "c"
