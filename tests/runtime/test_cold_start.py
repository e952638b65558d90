"""The first prediction on a cold cache compiles what it needs and nothing else.

A fresh process on an empty NUMBA_CACHE_DIR (and kernel folder) loads the reference LSTM and
steps a stream once: the only kernel compiled is the model's own `advance`, which the loader's
check of the plan and the stream share. The interpreter (interpreter.py, every cell inlined: three
times the compile time) is for EDGESEQ_SPECIALIZE=0 only, and pool kernels compile at a pool's
first step. The next process finds everything in the cache.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LSTM = ROOT / "export" / "pump-lstm.onnx"
FIRST_PREDICTION = (
    "import numpy as np, edgeseq\n"
    f"m = edgeseq.load({str(LSTM)!r})\n"
    "print(m.plan_note)\n"
    "m.stream().step(np.zeros(m.n_features, np.float32))\n"
)
SAVED = re.compile(
    r"data saved to '.*?([A-Za-z0-9_]+\.[A-Za-z_][A-Za-z0-9_]*)-\d+\.py\d+\.\d+\.nbc'"
)

pytestmark = pytest.mark.timeout(300)


def _compiled(env: dict[str, str]) -> list[str]:
    """The functions a fresh process compiled (module file stem, function) for the first
    prediction, from Numba's cache log."""
    run = subprocess.run([sys.executable, "-c", FIRST_PREDICTION], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=280)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fused plan verified" in run.stdout, run.stdout
    return sorted(SAVED.findall(run.stdout + run.stderr))


def test_a_cold_first_prediction_compiles_only_the_models_own_kernel(tmp_path: Path) -> None:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"),
               EDGESEQ_KERNEL_DIR=str(tmp_path / "kernels"), NUMBA_DEBUG_CACHE="1")  # fmt: skip
    env.pop("EDGESEQ_SPECIALIZE", None)
    cold = _compiled(env)
    assert [name.split(".")[-1] for name in cold] == ["advance"], cold
    assert cold[0].startswith("edgeseq_kernel_"), cold
    assert _compiled(env) == []  # warm: loaded from the cache
