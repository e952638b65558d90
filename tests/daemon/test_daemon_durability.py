"""`edgeseq serve` under the things that happen to a daemon in the field: kill -9 in the middle of
a checkpoint, SIGTERM/SIGINT, a state file of another model, a corrupt one or one with malformed
seq bookkeeping, temp files a killed writer left behind, model reloads (SIGHUP and --watch),
systemd's notify protocol, and a --max-streams table too large to hold.

Every daemon is a real subprocess (tests.daemon_harness.DaemonProcess) serving JSON lines over
TCP on 127.0.0.1 (port 0, read from its "listening" log line). Every prediction is checked
against an uninterrupted offline run (`Stream.feed` over all of a stream's samples), so a state
that was lost, restored from the wrong instant or applied twice shows up as a wrong number.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import edgeseq
from edgeseq.daemon.table import _bookkeeping
from edgeseq.errors import CheckpointError
from edgeseq.runtime.state_files import load_snapshot, save_snapshot
from tests.daemon_harness import ROOT, DaemonProcess, LineClient, offline_predictions

pytestmark = pytest.mark.timeout(300)

EXPORT = ROOT / "export"
LSTM = EXPORT / "pump-lstm.onnx"
GRU = EXPORT / "pump-gru.onnx"  # 3 features like the LSTM; one (16,) state instead of four (32,)
GRU_INT8 = EXPORT / "pump-gru-int8.onnx"  # another model with exactly the GRU's state keys
ONE_OUTPUT = EXPORT / "levels-regress-rnn.onnx"  # 1 feature, 1 output, one (16,) state
THREE_OUTPUTS = EXPORT / "classes-classify-gru.onnx"  # 1 feature, 3 outputs, one (16,) state
LISTEN = ("--listen", "tcp://127.0.0.1:0")
STATE = "state.npz"
PARTIAL = f".{STATE}.*.partial"  # state_files.py's temp files
TOL = 1e-6  # max abs error of a daemon's prediction (or a saved state) vs the offline run
ROUNDS = 4  # samples per stream in one pipelined block
BALLAST = 300  # idle streams that make each checkpoint write last a few ms (kills land inside)


# -- helpers ------------------------------------------------------------------------------------


class Daemon(DaemonProcess):
    """The harness's daemon; on the way out it also closes its clients and both pipes (an
    unclosed one is a ResourceWarning, an error under this pytest setup)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(*args, env=env)
        self.clients: list[LineClient] = []

    def connect(self, timeout: float = 30.0) -> LineClient:
        client = LineClient(self.tcp_port, timeout=timeout)
        self.clients.append(client)
        return client

    def read_to_end(self) -> None:
        """Wait for the harness's stderr reader to reach the end (the process has ended)."""
        for thread in threading.enumerate():
            if getattr(thread, "_target", None) == self._collect:
                thread.join(10)

    def __exit__(self, *exc: object) -> None:
        for client in self.clients:
            with contextlib.suppress(OSError):  # a killed daemon: the flush finds no reader
                client.close()
        if self.proc.poll() is None:
            self.kill9()
        self.read_to_end()
        super().__exit__(*exc)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@functools.cache
def loaded(path: Path) -> edgeseq.Model:
    """The model at `path`, loaded once per test session."""
    return edgeseq.load(path)


def fingerprint(path: Path) -> str:
    """What the daemon logs and names files with: the first 12 hex digits."""
    return loaded(path).fingerprint[:12]


def sequence(seed: int, length: int) -> np.ndarray:
    """A deterministic (length, 3) float32 sample sequence: a slow wave plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(length, dtype=np.float64)[:, None]
    wave = np.sin(t / 40.0 + np.arange(3) + seed)
    return (wave + 0.3 * rng.standard_normal((length, 3))).astype(np.float32)


class Fleet:
    """A few named streams: their samples and the uninterrupted offline predictions."""

    def __init__(self, model: Path, n_streams: int, length: int, seed: int = 0) -> None:
        self.ids = [f"pump-{k}" for k in range(n_streams)]
        self.xs = {sid: sequence(seed + k, length) for k, sid in enumerate(self.ids)}
        self.ys = {sid: offline_predictions(model, self.xs[sid]) for sid in self.ids}
        self.length = length

    def message(self, sid: str, seq: int) -> dict[str, Any]:
        return {"id": sid, "seq": seq, "x": self.xs[sid][seq].tolist()}

    def block(self, next_seq: dict[str, int], rounds: int = ROUNDS) -> list[dict[str, Any]]:
        """`rounds` samples of every stream from `next_seq` on, interleaved."""
        if max(next_seq.values()) + rounds > self.length:
            pytest.fail(f"the test's sample sequences ({self.length}) are too short")
        return [self.message(sid, next_seq[sid] + r) for r in range(rounds) for sid in self.ids]

    def check(self, answer: dict[str, Any]) -> None:
        """The answer is the uninterrupted run's prediction at its seq."""
        assert "error" not in answer, answer
        sid, seq = answer["id"], answer["seq"]
        error = np.abs(np.asarray(answer["y"]) - self.ys[sid][seq]).max()
        assert error <= TOL, f"{sid} seq {seq}: off the uninterrupted run by {error:.3g}"


def answers(client: LineClient, messages: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Send `messages` in one write; yield their answers as they arrive (any order across
    streams: a batch is applied in rounds)."""
    for message in messages:
        client.send(message)
    client.flush()
    for _ in messages:
        yield client.receive()


def exchange(client: LineClient, messages: list[dict[str, Any]]) -> dict[tuple[str, int], Any]:
    """Every answer to `messages`, by (id, seq)."""
    return {(a["id"], a["seq"]): a for a in answers(client, messages)}


class Progress:
    """What one client sent and had answered, per stream, while it streamed a Fleet."""

    def __init__(self, fleet: Fleet, next_seq: dict[str, int]) -> None:
        self.fleet, self.next_seq = fleet, dict(next_seq)
        self.sent = {sid: seq - 1 for sid, seq in next_seq.items()}
        self.answered = {sid: seq - 1 for sid, seq in next_seq.items()}
        self.last_y: dict[str, list[float]] = {}
        self.count = 0

    def stream_until_gone(self, client: LineClient) -> None:
        """Stream blocks, checking every answer, until the daemon goes away."""
        try:
            while True:
                self.stream_block(client)
        except (ConnectionError, OSError, ValueError):  # ValueError: a line cut by the kill
            return

    def stream_block(self, client: LineClient) -> None:
        block = self.fleet.block(self.next_seq)
        for message in block:
            self.sent[message["id"]] = max(self.sent[message["id"]], message["seq"])
        for answer in answers(client, block):
            self.fleet.check(answer)
            sid = answer["id"]
            if answer["seq"] > self.answered[sid]:
                self.answered[sid], self.last_y[sid] = answer["seq"], answer["y"]
            self.count += 1
        for sid in self.next_seq:
            self.next_seq[sid] += ROUNDS


def signal_at(daemon: Daemon, sig: int, at: float, writing_in: Path | None) -> None:
    """Send `sig` at monotonic time `at`, or (with `writing_in`) at the first instant after it
    that a checkpoint is being written there (its temp file exists)."""
    while time.monotonic() < at:
        time.sleep(0.001)
    if writing_in is not None:
        give_up = time.monotonic() + 5.0
        while time.monotonic() < give_up and not any(
            name.endswith(".partial") for name in os.listdir(writing_in)
        ):
            time.sleep(0.0002)
    daemon.proc.send_signal(sig)


def in_background(target: Any, *args: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def wait_for_checkpoint(path: Path, streams: int, timeout: float = 20.0) -> None:
    """Until `path` is a checkpoint holding `streams` streams."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(load_snapshot(path, None).ids) == streams:
            return
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint of {streams} streams in {path} within {timeout}s")


def stderr_at_exit(daemon: Daemon, timeout: float = 30.0) -> tuple[int, list[str]]:
    """Exit code and every stderr line, once the process ended and its stderr was read."""
    code = daemon.proc.wait(timeout)
    daemon.read_to_end()
    return code, list(daemon.raw_stderr)


def not_logs(lines: list[str]) -> list[str]:
    """stderr lines that are not the daemon's JSON log lines (tracebacks, say)."""
    return [line for line in lines if not line.startswith("{")]


def replace_model(target: Path, source: Path | bytes) -> None:
    """Swap the served file atomically, as a deployment should (write beside it, rename)."""
    fresh = target.with_name(f".{target.name}.new")
    if isinstance(source, bytes):
        fresh.write_bytes(source)
    else:
        shutil.copyfile(source, fresh)
    os.replace(fresh, target)


def real_checkpoint(path: Path, fleet: Fleet, upto: int) -> None:
    """What the daemon writes after applying seq 0..upto of every stream of `fleet`."""
    model = loaded(LSTM)
    states, seqs, ys = {}, {}, {}
    for sid in fleet.ids:
        stream = model.stream()
        stream.feed(fleet.xs[sid][: upto + 1])
        states[sid], seqs[sid], ys[sid] = stream.state, upto, fleet.ys[sid][upto].tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_snapshot(path, model.fingerprint, states, {"seq": seqs, "y": ys})


def flip_last_float(data: bytes, member: str) -> bytes:
    """Flip the lowest mantissa bit of the last float of an npz member: a finite value, so only
    the zip's CRC can tell."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo(member)
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    end = info.header_offset + 30 + name_len + extra_len + info.file_size
    flipped = bytearray(data)
    flipped[end - 4] ^= 1  # little endian: the first byte of the last float is its lowest
    return bytes(flipped)


# -- 1. kill -9 --------------------------------------------------------------------------------

KILLS = 20


def test_kill_9_at_random_instants_always_leaves_a_valid_checkpoint_that_continues_exactly(
    tmp_path: Path,
) -> None:
    """20 times: stream 5 pumps (plus 300 idle streams, so each checkpoint write takes a few
    ms), kill -9 at a random instant (every other time: while a checkpoint is being written),
    check the state file is a complete checkpoint whose states equal the offline run at its
    seqs, restart on the same folder and continue from those seqs."""
    state_dir = tmp_path / "state"
    state_file = state_dir / STATE
    fleet = Fleet(LSTM, 5, 40_000)
    model = loaded(LSTM)
    offline = {sid: model.stream() for sid in fleet.ids}  # fed up to the last restored seq
    fed = dict.fromkeys(fleet.ids, 0)
    ballast = [{"id": f"idle-{i}", "seq": 0, "x": [0.0, 0.0, 0.0]} for i in range(BALLAST)]
    rng = np.random.default_rng(2024)
    args = (str(LSTM), *LISTEN, "--state-dir", str(state_dir), "--checkpoint-interval", "20ms")
    restored, saved_y = dict.fromkeys(fleet.ids, -1), {}
    next_seq = dict.fromkeys(fleet.ids, 0)
    leftovers: list[Path] = []
    mid_write = with_leftover = 0
    lags: list[int] = []  # answered seq - restored seq: what a client resends after a kill
    for cycle in range(KILLS + 1):
        with Daemon(*args) as daemon:
            client = daemon.connect()
            daemon.wait_for("ready")
            assert not [p for p in leftovers if p.exists()], "temp files survived a restart"
            if cycle == 0:
                replies = exchange(client, [*ballast, *fleet.block(next_seq, 1)])
                for sid in fleet.ids:
                    fleet.check(replies[sid, 0])
                next_seq = dict.fromkeys(fleet.ids, 1)
                wait_for_checkpoint(state_file, BALLAST + len(fleet.ids))
            else:
                restore = daemon.wait_for("states restored")
                assert restore["streams"] == BALLAST + len(fleet.ids)
                for sid in fleet.ids:  # the restored seq is answered from memory
                    again = client.ask(fleet.message(sid, restored[sid]))
                    assert again.get("duplicate") is True, again
                    assert again["y"] == saved_y[sid]
            progress = Progress(fleet, next_seq)
            if cycle == KILLS:  # the last restart: continue once more, then stop cleanly
                progress.stream_block(client)
                assert progress.count == ROUNDS * len(fleet.ids)
                assert daemon.stop() == 0
                break
            writing = cycle % 2 == 1
            mid_write += writing
            at = time.monotonic() + rng.uniform(0.02, 0.25)
            killer = in_background(
                signal_at, daemon, signal.SIGKILL, at, state_dir if writing else None
            )
            progress.stream_until_gone(client)
            killer.join()
            assert daemon.proc.wait(10) == -signal.SIGKILL
        snap = load_snapshot(state_file, model.fingerprint)  # complete and valid, or it raises
        leftovers = sorted(state_dir.glob(PARTIAL))
        with_leftover += bool(leftovers)
        stray = set(os.listdir(state_dir)) - {STATE} - {p.name for p in leftovers}
        assert not stray, f"unexpected files after kill {cycle + 1}: {sorted(stray)}"
        assert len(snap.ids) == BALLAST + len(fleet.ids)
        for sid in fleet.ids:
            seq = snap.extra["seq"][sid]
            assert restored[sid] <= seq <= progress.sent[sid], (sid, restored[sid], seq)
            lags.append(progress.answered[sid] - seq)
            offline[sid].feed(fleet.xs[sid][fed[sid] : seq + 1])
            fed[sid] = seq + 1
            for key, value in offline[sid].state.items():  # states and seq of one instant
                gap = np.abs(snap.states[sid][key] - value).max()
                assert gap <= TOL, f"kill {cycle + 1}: {sid} {key} off the run at {seq} by {gap}"
            assert np.abs(np.asarray(snap.extra["y"][sid]) - fleet.ys[sid][seq]).max() <= TOL
            restored[sid], saved_y[sid], next_seq[sid] = seq, snap.extra["y"][sid], seq + 1
    assert with_leftover >= 1, "no kill landed during a checkpoint write; the test proved little"
    print(
        f"\n{KILLS} kills ({mid_write} aimed at a write, {with_leftover} left a temp file); "
        f"restored seqs {restored}; resend after a kill: median {int(np.median(lags))}, "
        f"max {max(lags)} samples"
    )


# -- 2. SIGTERM / SIGINT -----------------------------------------------------------------------

STOPS = 4


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_checkpoints_every_answered_sample_so_a_restart_continues_exactly(
    sig: int, tmp_path: Path
) -> None:
    """First with no periodic checkpoint at all (1 h), so the file can only come from the
    signal; then 4 times with the signal landing while a periodic checkpoint is being written.
    Each time: exit code 0, the file holds exactly the last answered seq of every stream, the
    duplicate of that seq is answered from memory after the restart, and the next predictions
    equal the uninterrupted run."""
    state_dir = tmp_path / "state"
    state_file = state_dir / STATE
    fleet = Fleet(LSTM, 3, 20_000, seed=100)
    ballast = [{"id": f"idle-{i}", "seq": 0, "x": [0.0, 0.0, 0.0]} for i in range(BALLAST)]
    args = (str(LSTM), *LISTEN, "--state-dir", str(state_dir))
    with Daemon(*args, "--checkpoint-interval", "1h") as daemon:
        client = daemon.connect()
        exchange(client, ballast)
        progress = Progress(fleet, dict.fromkeys(fleet.ids, 0))
        for _ in range(25):
            progress.stream_block(client)
        assert not state_file.exists()
        daemon.signal(sig)
        assert daemon.proc.wait(30) == 0
    rng = np.random.default_rng(int(sig))
    for cycle in range(STOPS + 1):
        snap = load_snapshot(state_file, None)
        wrong = []
        for sid in fleet.ids:
            saved, answered = snap.extra["seq"][sid], progress.answered[sid]
            if saved < answered:
                wrong.append(f"{sid}: seq {answered} was answered, the checkpoint holds {saved}")
            elif saved > answered:
                wrong.append(f"{sid}: the checkpoint holds {saved}, seq {answered} was answered")
        stop = f"{signal.Signals(sig).name} number {cycle + 1}"
        assert not wrong, (
            f"the final checkpoint after {stop} is not the last answer:\n" + "\n".join(wrong)
        )
        with Daemon(*args, "--checkpoint-interval", "20ms") as daemon:
            client = daemon.connect()
            assert daemon.wait_for("states restored")["streams"] == BALLAST + len(fleet.ids)
            for sid in fleet.ids:
                last = progress.answered[sid]
                again = client.ask(fleet.message(sid, last))
                assert again == {
                    "id": sid,
                    "seq": last,
                    "y": progress.last_y[sid],
                    "duplicate": True,
                    "durable": last,  # the final checkpoint holds it: the client may forget it
                }
            progress = Progress(fleet, {sid: seq + 1 for sid, seq in progress.answered.items()})
            if cycle == STOPS:
                progress.stream_block(client)
                assert daemon.stop() == 0
                break
            at = time.monotonic() + rng.uniform(0.02, 0.2)
            stopper = in_background(signal_at, daemon, sig, at, state_dir)
            progress.stream_until_gone(client)
            stopper.join()
            assert daemon.proc.wait(30) == 0


def test_a_stop_signal_with_a_client_connected_exits_without_a_traceback(tmp_path: Path) -> None:
    """systemd stops the service while sensors are connected: the exit is clean, and stderr
    holds only the JSON log lines."""
    args = (str(LSTM), *LISTEN, "--state-dir", str(tmp_path / "state"))
    with Daemon(*args) as daemon:
        client = daemon.connect()
        assert "y" in client.ask({"id": "pump-1", "seq": 0, "x": [0.1, 0.2, 0.3]})
        daemon.signal(signal.SIGTERM)
        code, stderr = stderr_at_exit(daemon)
    assert code == 0
    assert not not_logs(stderr), "stderr holds more than log lines:\n" + "\n".join(stderr)


# -- 3. a checkpoint of another model ---------------------------------------------------------


def test_a_checkpoint_of_another_model_is_refused_unless_reset_on_model_change(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    state_file = state_dir / STATE
    lstm_fp, gru_fp = fingerprint(LSTM), fingerprint(GRU)
    fleet = Fleet(LSTM, 2, 40)
    with Daemon(str(LSTM), *LISTEN, "--state-dir", str(state_dir)) as daemon:
        client = daemon.connect()
        progress = Progress(fleet, dict.fromkeys(fleet.ids, 0))
        for _ in range(5):
            progress.stream_block(client)
        assert daemon.stop() == 0
    saved = state_file.read_bytes()

    with Daemon(str(GRU), *LISTEN, "--state-dir", str(state_dir)) as daemon:
        code, stderr = stderr_at_exit(daemon)
    errors = [line for line in stderr if line.startswith("error:")]
    assert code == 2, stderr
    assert len(errors) == 1, stderr
    assert lstm_fp in errors[0] and gru_fp in errors[0] and STATE in errors[0], errors[0]
    assert "--reset-on-model-change" in errors[0]
    assert not [line for line in not_logs(stderr) if not line.startswith("error:")], stderr
    assert state_file.read_bytes() == saved, "the refused checkpoint was changed"

    gru = Fleet(GRU, 2, 40)
    args = (str(GRU), *LISTEN, "--state-dir", str(state_dir), "--reset-on-model-change")
    with Daemon(*args) as daemon:
        client = daemon.connect()
        discarded = daemon.wait_for("model changed: saved states discarded")
        aside = state_dir / f"{STATE}.{lstm_fp}.discarded"
        assert discarded["level"] == "warning" and discarded["moved_to"] == str(aside)
        assert aside.read_bytes() == saved
        assert daemon.wait_for("ready")["streams"] == 0
        fresh = Progress(gru, dict.fromkeys(gru.ids, 0))  # seq 0 again: not "stale"
        for _ in range(3):
            fresh.stream_block(client)
        assert daemon.stop() == 0
    assert load_snapshot(state_file, loaded(GRU).fingerprint).extra["seq"] == {
        sid: 3 * ROUNDS - 1 for sid in gru.ids
    }


# -- 4. a corrupt state file ------------------------------------------------------------------


def _garbage(real: bytes) -> bytes:
    return np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes()


def _truncated(real: bytes) -> bytes:
    return real[: len(real) // 2]


def _empty(real: bytes) -> bytes:
    return b""


def _bit_flipped(real: bytes) -> bytes:
    return flip_last_float(real, "state0.npy")


@pytest.mark.parametrize("corrupt", [_garbage, _truncated, _empty, _bit_flipped],
                         ids=["garbage", "truncated", "empty", "bit-flipped"])  # fmt: skip
def test_a_corrupt_state_file_is_refused_at_start_and_left_as_it_is(
    corrupt: Any, tmp_path: Path
) -> None:
    state_file = tmp_path / "state" / STATE
    real_checkpoint(state_file, Fleet(LSTM, 2, 30), upto=29)
    bad = corrupt(state_file.read_bytes())
    state_file.write_bytes(bad)
    with Daemon(str(LSTM), *LISTEN, "--state-dir", str(state_file.parent)) as daemon:
        code, stderr = stderr_at_exit(daemon)
        events = [entry["event"] for entry in daemon.logs]
    errors = [line for line in stderr if line.startswith("error:")]
    assert code == 2, stderr
    assert len(errors) == 1 and str(state_file) in errors[0], stderr
    assert not [line for line in not_logs(stderr) if not line.startswith("error:")], stderr
    assert "listening" not in events and "ready" not in events
    assert state_file.read_bytes() == bad, "the refused file was changed"


# -- 4b. malformed seq bookkeeping in a state file --------------------------------------------


def rewrite_extra(path: Path, change: Callable[[dict[str, Any]], object]) -> None:
    """Apply `change` to the `extra` in the checkpoint's header, in place (NaN and infinity are
    written as JSON's NaN and Infinity, which Python's json reads back)."""
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    header = json.loads(arrays["header"].tobytes())
    change(header["extra"])
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(path, **arrays)


MALFORMED = {  # case -> (a change to the extra the daemon wrote, what the error must name)
    "seq-list": (lambda e: e.update(seq=[29, 29]), "'seq'"),
    "seq-string": (lambda e: e.update(seq="29"), "'seq'"),
    "seq-int": (lambda e: e.update(seq=29), "'seq'"),
    "y-list": (lambda e: e.update(y=[[0.5], [0.5]]), "'y'"),
    "y-string": (lambda e: e.update(y="0.5"), "'y'"),
    "y-int": (lambda e: e.update(y=5), "'y'"),
    "seq-negative": (lambda e: e["seq"].update({"pump-1": -1}), "'seq' of stream 'pump-1'"),
    "seq-float": (lambda e: e["seq"].update({"pump-1": 29.0}), "'seq' of stream 'pump-1'"),
    "seq-true": (lambda e: e["seq"].update({"pump-1": True}), "'seq' of stream 'pump-1'"),
    "y-nan": (lambda e: e["y"].update({"pump-1": [float("nan")]}), "'y' of stream 'pump-1'"),
    "y-infinity": (lambda e: e["y"].update({"pump-1": [float("inf")]}), "'y' of stream 'pump-1'"),
    "y-too-wide": (lambda e: e["y"].update({"pump-1": [0.5, 0.5]}), "'y' of stream 'pump-1'"),
    "y-text-value": (lambda e: e["y"].update({"pump-1": ["0.5"]}), "'y' of stream 'pump-1'"),
    "unknown-key": (lambda e: e.update(lives=9), "'lives'"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_every_kind_of_malformed_bookkeeping_is_refused_naming_the_key(case: str) -> None:
    """The check itself, on what a daemon writes for two streams with one output each."""
    change, named = MALFORMED[case]
    extra: dict[str, Any] = {"seq": {"pump-0": 29, "pump-1": 29},
                             "y": {"pump-0": [0.5], "pump-1": [0.5]}}  # fmt: skip
    change(extra)
    with pytest.raises(CheckpointError, match="expected") as refused:
        _bookkeeping(extra, 1)
    assert named in str(refused.value)


@pytest.mark.parametrize("case", ["seq-list", "y-nan", "unknown-key"])
def test_a_state_file_with_malformed_seq_bookkeeping_is_refused_at_start_and_left_as_it_is(
    case: str, tmp_path: Path
) -> None:
    """The seq and y tables beside the states are checked before any state is restored: one
    error line naming the file, the key and what was expected; no traceback, no serving (a
    daemon for three of the kinds above; each daemon costs seconds)."""
    change, named = MALFORMED[case]
    state_file = tmp_path / "state" / STATE
    real_checkpoint(state_file, Fleet(LSTM, 2, 30), upto=29)
    rewrite_extra(state_file, change)
    bad = state_file.read_bytes()
    with Daemon(str(LSTM), *LISTEN, "--state-dir", str(state_file.parent)) as daemon:
        code, stderr = stderr_at_exit(daemon)
        events = [entry["event"] for entry in daemon.logs]
    errors = [line for line in stderr if line.startswith("error:")]
    assert code == 2, stderr
    assert len(errors) == 1, stderr
    assert str(state_file) in errors[0] and named in errors[0], errors[0]
    assert "expected" in errors[0], errors[0]
    assert not [line for line in not_logs(stderr) if not line.startswith("error:")], stderr
    assert not {"states restored", "listening", "ready"} & set(events), events
    assert state_file.read_bytes() == bad, "the refused file was changed"


def test_bookkeeping_the_daemon_writes_without_seq_or_answers_is_restored(tmp_path: Path) -> None:
    """Streams fed without seq (seq null), a sample whose output was not finite (y null) and an
    id with bookkeeping but no state are all what a daemon may write: restored, not refused."""
    state_file = tmp_path / "state" / STATE
    fleet = Fleet(LSTM, 2, 40)
    real_checkpoint(state_file, fleet, upto=29)

    def unsequenced(extra: dict[str, Any]) -> None:
        extra["seq"].update({"pump-0": None, "lost-1": None})
        extra["y"].update({"pump-0": None, "lost-1": None})

    rewrite_extra(state_file, unsequenced)
    with Daemon(str(LSTM), *LISTEN, "--state-dir", str(state_file.parent)) as daemon:
        client = daemon.connect()
        assert daemon.wait_for("states restored")["streams"] == 2
        again = client.ask(fleet.message("pump-1", 29))
        assert again.get("duplicate") is True and again["y"] == fleet.ys["pump-1"][29].tolist()
        fleet.check(client.ask(fleet.message("pump-0", 30)))  # no seq to resend from
        assert daemon.stop() == 0


def test_a_checkpoint_written_after_a_reload_to_another_output_width_is_restored(
    tmp_path: Path,
) -> None:
    """Answers given before a reload have the old model's width: they are answered from memory,
    but not written into a checkpoint the new model would refuse."""
    served = tmp_path / "models" / "model.onnx"
    served.parent.mkdir()
    shutil.copyfile(ONE_OUTPUT, served)
    args = (str(served), *LISTEN, "--state-dir", str(tmp_path / "state"))
    with Daemon(*args) as daemon:
        client = daemon.connect()
        first = exchange(client, [{"id": f"s-{k}", "seq": 0, "x": [0.5]} for k in range(2)])
        assert all(len(a["y"]) == 1 for a in first.values()), first
        replace_model(served, THREE_OUTPUTS)
        assert hup(daemon, "model reloaded")["new"] == fingerprint(THREE_OUTPUTS)
        assert client.ask({"id": "s-0", "seq": 0, "x": [0.5]})["y"] == first["s-0", 0]["y"]
        assert daemon.stop() == 0
    with Daemon(*args) as daemon:
        client = daemon.connect()
        assert daemon.wait_for("states restored")["streams"] == 2
        again = client.ask({"id": "s-0", "seq": 0, "x": [0.5]})
        assert again == {"id": "s-0", "seq": 0, "ok": True, "duplicate": True, "durable": 0}
        assert len(client.ask({"id": "s-0", "seq": 1, "x": [0.5]})["y"]) == 3
        assert daemon.stop() == 0


# -- 5. temp files of a killed writer ---------------------------------------------------------


def test_temp_files_a_killed_writer_left_are_removed_at_start_and_never_restored(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    fleet = Fleet(LSTM, 2, 60)
    real_checkpoint(state_dir / STATE, fleet, upto=29)
    newer = tmp_path / "newer.npz"
    real_checkpoint(newer, fleet, upto=49)  # a complete but never renamed write: not the state
    leftovers = [
        state_dir / f".{STATE}.k3j2h1aa.partial",
        state_dir / f".{STATE}.x9y8z7bb.partial",
        state_dir / f".{STATE}.q1w2e3cc.partial",
    ]
    leftovers[0].write_bytes(b"\x00" * 100)
    leftovers[1].write_bytes(newer.read_bytes()[:300])
    leftovers[2].write_bytes(newer.read_bytes())
    unrelated = [state_dir / "notes.txt", state_dir / "other.partial"]
    for path in unrelated:
        path.write_text("not the daemon's")
    with Daemon(str(LSTM), *LISTEN, "--state-dir", str(state_dir)) as daemon:
        client = daemon.connect()
        assert daemon.wait_for("states restored")["streams"] == 2
        assert not [p for p in leftovers if p.exists()]
        assert all(p.exists() for p in unrelated), "files not the daemon's were removed"
        for sid in fleet.ids:
            again = client.ask(fleet.message(sid, 29))
            assert again.get("duplicate") is True and again["y"] == fleet.ys[sid][29].tolist()
        progress = Progress(fleet, dict.fromkeys(fleet.ids, 30))
        for _ in range(5):
            progress.stream_block(client)  # continues from 29, not from the temp file's 49
        assert daemon.stop() == 0

    (state_dir / STATE).unlink()
    leftovers[2].write_bytes(newer.read_bytes())  # temp files alone are no checkpoint
    with Daemon(str(LSTM), *LISTEN, "--state-dir", str(state_dir)) as daemon:
        assert daemon.wait_for("ready")["streams"] == 0
        assert not leftovers[2].exists()
        assert daemon.stop() == 0


# -- 6. SIGHUP reload --------------------------------------------------------------------------


class Reloads:
    """Two streams fed through one connection across model reloads, checked against offline
    streams that get the same model swaps: kept state, or fresh when the shapes differ."""

    def __init__(self, client: LineClient) -> None:
        self.client, self.ids = client, ["pump-a", "pump-b"]
        self.xs = {sid: sequence(40 + k, 200) for k, sid in enumerate(self.ids)}
        self.seq = 0
        self.offline = {sid: loaded(LSTM).stream() for sid in self.ids}

    def swap(self, path: Path, keep: bool) -> None:
        for sid in self.ids:
            stream = loaded(path).stream()
            if keep:
                stream.state = self.offline[sid].state
            self.offline[sid] = stream

    def samples(self, n: int) -> None:
        """n samples of each stream; every answer equals the offline stream's prediction."""
        block = [
            {"id": sid, "seq": self.seq + r, "x": self.xs[sid][self.seq + r].tolist()}
            for r in range(n)
            for sid in self.ids
        ]
        got = exchange(self.client, block)
        for sid in self.ids:
            want = self.offline[sid].feed(self.xs[sid][self.seq : self.seq + n])
            ys = np.array([got[sid, self.seq + r]["y"] for r in range(n)])
            assert np.abs(ys - want).max() <= TOL, f"{sid} seq {self.seq}..: off by {ys - want}"
        self.seq += n


def hup(daemon: Daemon, event: str) -> dict[str, Any]:
    mark = len(daemon.logs)
    daemon.signal(signal.SIGHUP)
    return daemon.wait_for(event, timeout=30, after=mark)


def test_sighup_reloads_the_model_file_keeping_connections_and_states_that_fit(
    tmp_path: Path,
) -> None:
    served = tmp_path / "models" / "pump.onnx"
    served.parent.mkdir()
    shutil.copyfile(LSTM, served)
    with Daemon(str(served), *LISTEN) as daemon:
        client = daemon.connect()
        run = Reloads(client)
        run.samples(20)

        replace_model(served, LSTM)  # the same model again: states kept
        entry = hup(daemon, "model reloaded")
        assert entry["level"] == "info" and entry["old"] == entry["new"]
        run.samples(20)

        replace_model(served, GRU)  # other state shapes: every stream starts fresh
        entry = hup(daemon, "model reloaded; state shapes differ, every stream was reset")
        assert entry["level"] == "warning" and entry["new"] == fingerprint(GRU)
        run.swap(GRU, keep=False)
        run.samples(20)

        replace_model(served, GRU_INT8)  # another model, same state keys: states kept
        entry = hup(daemon, "model reloaded")
        assert entry["new"] == fingerprint(GRU_INT8)
        run.swap(GRU_INT8, keep=True)
        run.samples(20)
        last = {"id": "pump-a", "seq": run.seq - 1, "x": run.xs["pump-a"][run.seq - 1].tolist()}
        assert client.ask(last).get("duplicate") is True  # seq bookkeeping survives a reload

        replace_model(served, b"this is not an onnx file")
        entry = hup(daemon, "reload failed; the previous model keeps serving")
        assert entry["level"] == "error"
        run.samples(20)  # still GRU-int8, same states

        assert daemon.stop() == 0


# -- 7. --watch --------------------------------------------------------------------------------


def test_watch_reloads_when_the_model_file_is_replaced_and_survives_a_bad_file(
    tmp_path: Path,
) -> None:
    served = tmp_path / "models" / "pump.onnx"
    served.parent.mkdir()
    shutil.copyfile(LSTM, served)
    config = tmp_path / "serve.toml"
    config.write_text("watch_interval = 0.2\n")
    with Daemon(str(served), *LISTEN, "--config", str(config), "--watch") as daemon:
        client = daemon.connect()
        run = Reloads(client)
        run.samples(10)

        mark = len(daemon.logs)
        replace_model(served, GRU)
        event = "model reloaded; state shapes differ, every stream was reset"
        daemon.wait_for(event, timeout=10, after=mark)
        run.swap(GRU, keep=False)
        run.samples(10)

        mark = len(daemon.logs)
        replace_model(served, LSTM.read_bytes()[:3000])  # a torn copy
        daemon.wait_for("reload failed; the previous model keeps serving", timeout=10, after=mark)
        run.samples(10)

        mark = len(daemon.logs)
        replace_model(served, GRU_INT8)  # the watch goes on after a failed reload
        entry = daemon.wait_for("model reloaded", timeout=10, after=mark)
        assert entry["new"] == fingerprint(GRU_INT8)
        run.swap(GRU_INT8, keep=True)
        run.samples(10)
        assert daemon.stop() == 0


def _retrained_copy(source: Path) -> bytes:
    """`source` with one weight changed in its lowest bit: another model of the same size."""
    data = source.read_bytes()
    proto = onnx.load(str(source))
    raw = max((t.raw_data for t in proto.graph.initializer), key=len)
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0
    changed = bytearray(data)
    changed[at] ^= 1
    return bytes(changed)


def test_watch_notices_a_replacement_that_kept_size_and_mtime(tmp_path: Path) -> None:
    """`cp -p`, `rsync -a` and reproducible builds keep mtimes, and a retrained model of the
    same architecture often has the same size; the rename gives the file a new inode."""
    served = tmp_path / "models" / "pump.onnx"
    served.parent.mkdir()
    shutil.copyfile(GRU, served)
    retrained = _retrained_copy(GRU)
    assert len(retrained) == served.stat().st_size
    config = tmp_path / "serve.toml"
    config.write_text("watch_interval = 0.2\n")
    with Daemon(str(served), *LISTEN, "--config", str(config), "--watch") as daemon:
        daemon.wait_for("ready")
        mark = len(daemon.logs)
        before = served.stat()
        fresh = served.with_name(".pump.onnx.new")
        fresh.write_bytes(retrained)
        os.utime(fresh, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.replace(fresh, served)
        entry = daemon.wait_for("model reloaded", timeout=5, after=mark)
        assert entry["old"] != entry["new"]
        assert daemon.stop() == 0


# -- 8. systemd notify -------------------------------------------------------------------------


class NotifySocket:
    """A unix datagram socket like systemd's $NOTIFY_SOCKET, recording (time, fields)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="notify-", dir="/tmp")  # AF_UNIX paths are short
        self.path = os.path.join(self.dir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = in_background(self._receive)

    def _receive(self) -> None:
        while not self._done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def wait_for(self, key: str, after: int = 0, timeout: float = 30.0) -> int:
        """Index of the first message (from `after`) holding `key`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for i, (_, fields) in enumerate(self.messages[after:], start=after):
                    if key in fields:
                        return i
            time.sleep(0.01)
        raise AssertionError(f"no {key} within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_systemd_gets_ready_when_serving_watchdog_pings_reloading_and_stopping() -> None:
    notify = NotifySocket()
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"}
    try:
        with Daemon(str(LSTM), *LISTEN, env=env) as daemon:
            ready = notify.wait_for("READY")
            assert ready == 0, f"something came before READY=1: {notify.messages[:ready]}"
            fields = notify.messages[ready][1]
            assert fields["READY"] == "1" and "pump-lstm.onnx" in fields.get("STATUS", "")
            client = daemon.connect(timeout=5)  # listening by the time of READY
            assert "y" in client.ask({"id": "pump-1", "seq": 0, "x": [0.1, 0.2, 0.3]})

            time.sleep(3.0)  # a pinging loop is what is tested; a 1 s timeout spares slow hosts
            with notify._lock:
                pings = [t for t, f in notify.messages if f.get("WATCHDOG") == "1"]
            gaps = np.diff(pings)
            assert len(pings) >= 5, f"{len(pings)} WATCHDOG=1 in 3 s with WATCHDOG_USEC=1000000"
            assert gaps.max() < 1.0, f"a watchdog gap of {gaps.max():.3f}s exceeds the timeout"

            mark = len(notify.messages)
            daemon.signal(signal.SIGHUP)
            reloading = notify.wait_for("RELOADING", after=mark)
            assert int(notify.messages[reloading][1]["MONOTONIC_USEC"]) > 0
            assert notify.wait_for("READY", after=reloading) > reloading
            daemon.wait_for("model reloaded")
            assert "y" in client.ask({"id": "pump-1", "seq": 1, "x": [0.1, 0.2, 0.3]})

            mark = len(notify.messages)
            daemon.signal(signal.SIGTERM)
            stopping = notify.wait_for("STOPPING", after=mark)
            assert notify.messages[stopping][1]["STOPPING"] == "1"
            assert daemon.proc.wait(30) == 0
    finally:
        notify.close()
    print(f"\nwatchdog: {len(pings)} pings in 1 s, largest gap {gaps.max() * 1e3:.0f} ms")


# -- 9. --max-streams --------------------------------------------------------------------------

BENCH_LSTM = EXPORT / "bench-lstm.onnx"  # 256 floats of state a stream: 1 GiB for 10**6 streams
ADDRESS_SPACE = 10**9  # bytes a daemon may map in the out-of-memory test: less than that table


@pytest.mark.parametrize("where", ["1000001", "1000000000000", str(10**30), "config"])
def test_max_streams_beyond_what_one_table_can_hold_is_refused_with_one_error_line(
    where: str, tmp_path: Path
) -> None:
    if where == "config":
        config = tmp_path / "serve.toml"
        config.write_text("max_streams = 1000000000000\n")
        args: tuple[str, ...] = ("--config", str(config))
    else:
        args = ("--max-streams", where)
    with Daemon(str(LSTM), *LISTEN, *args) as daemon:
        code, stderr = stderr_at_exit(daemon)
    errors = [line for line in stderr if line.startswith("error:")]
    assert code == 2, stderr
    assert len(errors) == 1 and "max_streams" in errors[0] and "1,000,000" in errors[0], stderr
    assert not [line for line in not_logs(stderr) if not line.startswith("error:")], stderr


def test_the_largest_max_streams_serves() -> None:
    with Daemon(str(LSTM), *LISTEN, "--max-streams", "1000000") as daemon:
        client = daemon.connect()
        assert "y" in client.ask({"id": "pump-1", "seq": 0, "x": [0.1, 0.2, 0.3]})
        assert daemon.stop() == 0


def test_a_stream_table_that_does_not_fit_in_memory_is_refused_with_one_error_line() -> None:
    """A board with less memory than --max-streams states need: a clear error, not a traceback
    (the address space is capped below the table's size, so the allocation fails anywhere)."""

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    cmd = [sys.executable, "-m", "edgeseq", "serve", str(BENCH_LSTM), "--max-streams", "1000000"]
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          cwd=ROOT, timeout=120, preexec_fn=cap_memory)  # fmt: skip
    stderr = done.stderr.splitlines()
    errors = [line for line in stderr if line.startswith("error:")]
    assert done.returncode == 2, stderr
    assert len(errors) == 1 and "max_streams is 1000000" in errors[0], stderr
    assert "GiB" in errors[0] and "does not fit in memory" in errors[0], errors[0]
    assert not [line for line in not_logs(stderr) if not line.startswith("error:")], stderr
