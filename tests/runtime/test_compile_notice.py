"""A cold Numba cache's compile says so before it starts: through `logging` in Python, on
stderr from the command line, as the daemon's first log line; a warm cache says nothing.

How soon is the bench's business (timing is never a test's); here the order is what counts:
the notice comes before the compile's result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeseq.runtime.kernels.compile_notice import MESSAGE
from tests.daemon_harness import ROOT

pytestmark = pytest.mark.timeout(600)
MODEL = str(ROOT / "export" / "pump-gru.onnx")
PYTHON_USER = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
import numpy as np, edgeseq
model = edgeseq.load(sys.argv[1])
print("prediction", model.stream().step(np.ones(model.n_features, np.float32)), file=sys.stderr)
"""


def _cold(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"),
                EDGESEQ_KERNEL_DIR=str(tmp_path / "kernels"))  # fmt: skip


def _stderr(args: list[str], env: dict[str, str], stdin: str = "") -> list[str]:
    done = subprocess.run(args, env=env, input=stdin, capture_output=True, text=True,
                          timeout=500, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stderr.splitlines()


def test_the_python_api_logs_the_compile_before_it_and_not_on_a_warm_cache(tmp_path):
    env = _cold(tmp_path)
    cold = _stderr([sys.executable, "-c", PYTHON_USER, MODEL], env)
    assert cold[0] == f"edgeseq.runtime: {MESSAGE}", cold
    assert sum(MESSAGE in line for line in cold) == 1 and cold[-1].startswith("prediction")
    warm = _stderr([sys.executable, "-c", PYTHON_USER, MODEL], env)
    assert not any(MESSAGE in line for line in warm), warm


def test_the_daemons_first_log_line_on_a_cold_cache_is_the_notice(tmp_path):
    lines = _stderr([sys.executable, "-m", "edgeseq", "serve", MODEL, "--log-format", "text"],
                    _cold(tmp_path), stdin='{"id": "a", "seq": 0, "x": [1, 2, 3]}\n')  # fmt: skip
    assert MESSAGE in lines[0], lines
    assert any("model loaded" in line for line in lines[1:])


def test_the_command_lines_handler_prints_the_notice_on_stderr(tmp_path):
    """What every command but serve installs (cli.run): the notice as an `edgeseq:` line."""
    script = (
        "import sys, numpy as np; from edgeseq.cli import app; app._say_what_the_runtime_does()"
        "; import edgeseq; m = edgeseq.load(sys.argv[1]); m.stream().step(np.ones(3))"
    )
    lines = _stderr([sys.executable, "-c", script, MODEL], _cold(tmp_path))
    assert lines == [f"edgeseq: {MESSAGE}"], lines
