"""A daemon that had to compile its kernels starts afresh, so it does not carry the compiler's
memory for months (edgeseq/daemon/service.py, runtime/kernels/compiler_memory.py).

Here the model's own kernels are cold (a new EDGESEQ_KERNEL_DIR; the generic kernels stay in
the shared cache), which compiles a dozen kernels in a few seconds instead of a minute.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from numba import njit

from edgeseq.daemon.resident import resident_mib
from edgeseq.runtime.kernels.compiler_memory import count_compiles
from tests.daemon_harness import DEFAULT_MODEL, DaemonProcess, offline_predictions

AFRESH = "kernels compiled at start; starting afresh to leave the compiler's memory behind"


def test_count_compiles_counts_compilations_and_not_cache_loads():
    with count_compiles() as first:

        @njit
        def plus_one(x):
            return x + 1

        plus_one(1)
        plus_one(1.5)  # a second signature: a second compilation
    with count_compiles() as again:
        plus_one(2)
    assert (first.count, again.count) == (2, 0)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_daemon_that_compiled_at_start_restarts_in_place_and_loses_no_input(tmp_path):
    env = {"EDGESEQ_KERNEL_DIR": str(tmp_path / "kernels")}
    xs = np.random.default_rng(3).standard_normal((3, 3)).astype(np.float32)
    lines = "".join(
        json.dumps({"id": "p1", "seq": t, "x": [float(v) for v in x]}) + "\n"
        for t, x in enumerate(xs)
    )
    with DaemonProcess(str(DEFAULT_MODEL), stdin=subprocess.PIPE, env=env) as daemon:
        assert daemon.proc.stdin is not None and daemon.proc.stdout is not None
        daemon.proc.stdin.write(lines.encode())  # written while it compiles: must survive exec
        daemon.proc.stdin.flush()
        restart = daemon.wait_for(AFRESH, timeout=300)
        ready = daemon.wait_for("ready", timeout=120)
        assert restart["kernels"] >= 1
        assert ready["pid"] == daemon.proc.pid  # the same process, as systemd tracks it
        after = resident_mib(daemon.proc.pid)
        assert after is not None
        # README: "the restart gives back what the compile left behind"
        assert after < restart["rss_mib"], (after, restart["rss_mib"])
        loaded = [e for e in daemon.logs if e.get("event") == "model loaded"]
        assert len(loaded) == 2 and loaded[1]["seconds"] < loaded[0]["seconds"]
        answers = [json.loads(daemon.proc.stdout.readline()) for _ in range(len(xs))]
        daemon.proc.stdin.close()
        assert daemon.proc.wait(60) == 0
    expected = offline_predictions(DEFAULT_MODEL, xs)
    assert [a["seq"] for a in answers] == [0, 1, 2]
    np.testing.assert_allclose([a["y"] for a in answers], expected, atol=1e-5)

    # The cache is warm now: the next start serves from its first process.
    with DaemonProcess(str(DEFAULT_MODEL), env=env) as warm:
        warm.wait_for("ready", timeout=120)
        assert not any(e.get("event") == AFRESH for e in warm.logs)
        warm.stop()


def test_a_daemon_whose_kernels_cannot_be_kept_says_so_and_serves_from_its_first_process(
    tmp_path,
):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = {"EDGESEQ_KERNEL_DIR": str(blocker / "kernels")}  # cannot be created, even by root
    with DaemonProcess(str(DEFAULT_MODEL), "--listen", "tcp://127.0.0.1:0", env=env) as daemon:
        ready = daemon.wait_for("ready", timeout=300)
        events = [e.get("event", "") for e in daemon.logs]
        assert any(e.startswith("kernels compiled at start into a folder of this process")
                   for e in events), events  # fmt: skip
        assert AFRESH not in events and events.count("model loaded") == 1
        assert ready["pid"] == daemon.proc.pid
        assert daemon.stop() == 0


def test_only_the_edgeseq_command_itself_restarts_its_process(tmp_path, monkeypatch):
    """cli.main([...]) called from other Python code (a test runner, a user's program) must
    never re-run that program's command line; nor may a --config read from a pipe be lost."""
    from edgeseq.cli import serve as serve_command

    config = tmp_path / "serve.toml"
    config.write_text('model = "m.onnx"\n')
    assert not serve_command._may_start_afresh(None)  # OWN_PROCESS is set by cli.run() only
    monkeypatch.setattr(serve_command, "OWN_PROCESS", True)
    assert serve_command._may_start_afresh(None) and serve_command._may_start_afresh(config)
    assert not serve_command._may_start_afresh(Path("/dev/stdin"))
