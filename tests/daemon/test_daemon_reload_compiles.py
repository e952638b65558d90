"""A reload that has to compile does not stop the daemon answering.

`edgeseq serve` on a cold Numba cache (a fresh NUMBA_CACHE_DIR and kernel folder), then SIGHUP
to a model of another shape whose kernels nobody compiled yet: while its kernels compile, one
client keeps sending one stream's samples and every one is answered, without an error, by the
old model; once the new model is ready the daemon swaps, and the later answers are the new
model's. Each answer is checked against offline runs: the old model's over the whole sequence,
or (after the swap, where the state shapes differ and the stream starts afresh) the new
model's from the sample where the swap happened.
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import edgeseq
from tests.daemon_harness import ROOT, DaemonProcess, LineClient, assert_no_traceback

pytestmark = pytest.mark.timeout(300)

OLD = ROOT / "export" / "pump-lstm.onnx"
NEW = ROOT / "export" / "pump-gru.onnx"  # 3 features like OLD, other state shapes, other kernels
TOL = 1e-5
AFTER_SWAP = 5  # samples sent once the reload is logged


def _sequence(length: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    t = np.arange(length, dtype=np.float64)[:, None]
    wave = np.sin(t / 30.0 + np.arange(3))
    return (wave + 0.3 * rng.standard_normal((length, 3))).astype(np.float32)


def _seen(daemon: DaemonProcess, event: str, after: int) -> bool:
    return any(entry.get("event") == event for entry in daemon.logs[after:])


class Sender:
    """One stream's samples, one request at a time; every answer kept with whether the daemon
    had logged "reloading" before it arrived."""

    def __init__(self, client: LineClient, xs: np.ndarray) -> None:
        self.client, self.xs = client, xs
        self.ys: list[list[float]] = []
        self.during: list[bool] = []
        self.slowest = 0.0

    def send(self, reloading: bool) -> None:
        seq = len(self.ys)
        start = time.monotonic()
        got = self.client.ask({"id": "pump", "seq": seq, "x": self.xs[seq].tolist()})
        self.slowest = max(self.slowest, time.monotonic() - start)
        assert "error" not in got and got.get("seq") == seq, got
        self.ys.append(got["y"])
        self.during.append(reloading)


def _swap_point(ys: np.ndarray, old: np.ndarray, new_from: Callable[[int], np.ndarray]) -> int:
    """The first sample answered by the new model: every earlier answer is the old model's,
    every later one the new model's, fed from that sample on a fresh state."""
    differs = np.abs(ys - old[: len(ys)]).max(axis=1) > TOL
    swap = int(np.argmax(differs)) if differs.any() else len(ys)
    assert not differs[:swap].any()
    want = new_from(swap)
    assert np.abs(ys[swap:] - want).max(initial=0.0) <= TOL, "after the swap: not the new model"
    return swap


def test_answers_keep_flowing_while_a_reload_compiles(tmp_path: Path) -> None:
    served = tmp_path / "pump.onnx"
    shutil.copyfile(OLD, served)
    cold = {"NUMBA_CACHE_DIR": str(tmp_path / "numba"), "EDGESEQ_KERNEL_DIR": str(tmp_path / "k")}
    xs = _sequence(200_000)
    with DaemonProcess(str(served), "--listen", "tcp://127.0.0.1:0", env=cold) as daemon:
        client = LineClient(daemon.tcp_port, timeout=120)
        sender = Sender(client, xs)
        for _ in range(5):
            sender.send(reloading=False)
        fresh = served.with_name(".pump.onnx.new")
        shutil.copyfile(NEW, fresh)
        fresh.replace(served)
        mark = len(daemon.logs)
        daemon.signal(signal.SIGHUP)
        while not _seen(daemon, "model reloaded; state shapes differ, every stream was reset",
                        mark):  # fmt: skip
            assert len(sender.ys) < len(xs) - AFTER_SWAP, "the reload never finished"
            sender.send(reloading=_seen(daemon, "reloading", mark))
        for _ in range(AFTER_SWAP):
            sender.send(reloading=False)
        loaded = daemon.wait_for("model loaded", after=mark)
        client.close()
        assert daemon.stop() == 0
    assert_no_traceback(daemon)

    assert loaded["compiled"] > 0, "the reload found its kernels cached: it proves nothing"
    ys = np.array(sender.ys, np.float32)
    old = edgeseq.load(OLD).stream().feed(xs[: len(ys)])
    new = edgeseq.load(NEW)
    swap = _swap_point(ys, old, lambda at: new.stream().feed(xs[at : len(ys)]))
    answered_while_compiling = sum(sender.during[:swap])
    seconds, slowest = loaded["seconds"], sender.slowest
    print(f"reload compiled {loaded['compiled']} kernels in {seconds} s; "
          f"{answered_while_compiling} answers meanwhile; slowest {slowest:.3f} s")  # fmt: skip
    assert answered_while_compiling >= 10, "too few answers came during the reload"
    assert len(ys) - swap >= AFTER_SWAP  # the new model answered the last ones
