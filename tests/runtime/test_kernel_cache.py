"""Numba's cache never serves a kernel compiled from other sources (kernel_cache.py).

In a copy of the package: warm every kernel path, run again (nothing compiles, the same
answers), then edit a helper that every cell inlines (fastmath.tanh) and run again: every path's
answers change. Before kernel_cache, the pool kernels kept the old tanh (their cache entries
were keyed on their own files only).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import edgeseq
from tests.runtime.test_runtime_graphs import _spec_graph

ROOT = Path(__file__).resolve().parents[2]
EXPORTED = [ROOT / "export" / f"pump-{cell}.onnx" for cell in ("lstm", "gru", "rnn")]
# The cells only the model's own kernels run (clip, peepholes, GRU linear_before_reset=0).
ANY_CELLS = {
    "lstm-any": {"op": "LSTM", "clip": 0.4, "peepholes": True},
    "gru-any": {"op": "GRU", "clip": 0.5},
    "rnn-any": {"op": "RNN", "clip": 1.0},
}
POOLS = (1, 64, 300, 600)  # own kernel serial, parallel; interpreter parallel; BLAS
STEPS = 6

PROBE = f"""
import dataclasses, json, os, sys
import numpy as np
import edgeseq
from edgeseq.runtime.engines import KernelEngine

assert edgeseq.__file__.startswith(sys.argv[1]), edgeseq.__file__  # the copy, not the original
answers = {{}}
for path in sys.argv[3:]:
    modes = ("1", "0") if "pump-" in path else ("1",)  # "0": the interpreter's kernels
    for specialize in modes:
        edgeseq.config.ENV = dataclasses.replace(edgeseq.config.ENV, specialize=specialize == "1")
        model = edgeseq.load(path)
        xs = np.random.default_rng(3).standard_normal(({STEPS}, model.n_features), np.float32)
        stream, name = model.stream(), os.path.basename(path) + "/" + specialize
        assert isinstance(stream._engine, KernelEngine), name
        answers[name + "/step"] = np.stack([stream.step(x) for x in xs]).ravel().tolist()
        answers[name + "/feed"] = model.stream().feed(xs).ravel().tolist()
        for n in {POOLS}:
            pool, ids = model.pool(n), [f"s{{i}}" for i in range(n)]
            block = np.resize(xs, (n, model.n_features)) * np.float32(0.5)
            ys = [pool.step(ids, block) for _ in range(3)]
            answers[f"{{name}}/pool{{n}}"] = np.concatenate(ys).ravel().tolist()
with open(sys.argv[2], "w") as fh:
    json.dump(answers, fh)
"""


@pytest.fixture(scope="module")
def copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """edgeseq copied to a folder of its own, with the models every cell needs."""
    folder = tmp_path_factory.mktemp("kernel-cache")
    shutil.copytree(Path(edgeseq.__file__).parent, folder / "pkg" / "edgeseq",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    for name, spec in ANY_CELLS.items():
        onnx.save(_spec_graph(**spec), folder / f"{name}.onnx")
    return folder


def _run(copy: Path, label: str) -> tuple[dict[str, list[float]], str]:
    """Every kernel path's answers, and Numba's cache log, from a fresh process on the copy."""
    models = [str(p) for p in EXPORTED] + [str(copy / f"{n}.onnx") for n in ANY_CELLS]
    env = dict(os.environ, PYTHONPATH=str(copy / "pkg"), NUMBA_CACHE_DIR=str(copy / "numba"),
               EDGESEQ_KERNEL_DIR=str(copy / "kernels"), NUMBA_NUM_THREADS="2",
               NUMBA_DEBUG_CACHE="1", PYTHONDONTWRITEBYTECODE="1")  # fmt: skip
    out = copy / f"{label}.json"
    cmd = [sys.executable, "-c", PROBE, str(copy / "pkg"), str(out), *models]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=copy)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_an_unchanged_package_compiles_nothing_and_an_edited_helper_changes_every_path(copy):
    cold, cold_log = _run(copy, "cold")
    assert "data saved to" in cold_log  # the probe compiled (and cached) its kernels
    assert len(cold) == 3 * 2 * (2 + len(POOLS)) + len(ANY_CELLS) * (2 + len(POOLS))

    warm, warm_log = _run(copy, "warm")
    assert warm == cold
    assert "data loaded from" in warm_log and "data saved to" not in warm_log, [
        line for line in warm_log.splitlines() if "data saved to" in line
    ][:5]

    fastmath = copy / "pkg" / "edgeseq" / "runtime" / "kernels" / "fastmath.py"
    text = fastmath.read_text()
    assert text.count("    return p / q\n") == 1
    # tanh 0.002% larger: every answer moves, and the plans still pass their check against the
    # graph (relative gap 1e-4), so every path still runs the kernels
    fastmath.write_text(
        text.replace("    return p / q\n", "    return p / q * np.float32(1.00002)\n")
    )
    edited, edited_log = _run(copy, "edited")
    assert "data saved to" in edited_log
    assert edited.keys() == cold.keys()
    unchanged = [path for path in cold if edited[path] == cold[path]]  # stale code: bit for bit
    assert unchanged == [], f"served kernels compiled from the old fastmath.tanh: {unchanged}"
    gaps = [
        np.abs(np.subtract(edited[p], cold[p])).max() / (1 + np.abs(cold[p]).max()) for p in cold
    ]
    assert max(gaps) < 1e-3  # the edit, not a broken kernel
