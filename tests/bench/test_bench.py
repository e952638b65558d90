"""The benchmark harness: the C reference runs the same program as the kernels, and the report
judges each target from the measured figures."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import edgeseq
from edgeseq.bench.markdown import markdown, targets
from edgeseq.bench.measure import c_step_ns, streaming_backends

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)
def test_the_c_reference_runs_the_models_program():
    ns = c_step_ns(edgeseq.load(ROOT / "export" / "pump-rnn.onnx"), steps=2_000)
    assert ns is not None and ns > 0


def _figures(step_us: float) -> dict:
    timing = {"median_us": step_us, "p99_us": 2 * step_us}
    return {
        "model": "bench-m.onnx", "plan": "fused", "c_step_us": 3.0, "feed_us_per_sample": 3.3,
        "step": {"numba": timing, "onnxruntime run()": {"median_us": 50.0, "p99_us": 60.0},
                 "pytorch eager": {"median_us": 200.0, "p99_us": 300.0}},
        "pool": {1024: {"edgeseq_samples_per_s": 2e5, "onnxruntime_samples_per_s": 1e5,
                        "backends": {"onnxruntime": 9e4, "numpy": 3e4}}},
        "first_prediction_cold_s": 20.0, "first_prediction_warm_s": 0.8, "rss_mib": 120.0,
        "other_backends": {"onnxruntime": {"first_prediction_s": 0.5, "rss_mib": 90.0}},
    }  # fmt: skip


def test_targets_are_judged_from_the_ratios():
    fast = {name: ok for name, _, _, ok in targets(_figures(4.0))}
    slow = {name: ok for name, _, _, ok in targets(_figures(6.0))}
    assert fast["step vs ONNX Runtime run() (seq_len 1)"] and fast["step / C step"]
    assert not slow["step vs ONNX Runtime run() (seq_len 1)"] and not slow["step / C step"]
    assert fast["feed per sample / C step"]  # 3.3 / 3.0 = 1.1 <= 1.2
    slow_feed = dict(_figures(4.0), feed_us_per_sample=4.0)  # 1.33 > 1.2
    assert not {n: ok for n, _, _, ok in targets(slow_feed)}["feed per sample / C step"]
    assert fast["pool of 1024 vs ONNX Runtime batch"] and fast["first prediction, warm cache (s)"]


def test_the_report_shows_every_figure_and_verdict():
    report = markdown([_figures(4.0)], "edgeseq bench m.onnx")
    assert "| numba | 4.00 | 8.00 |" in report
    assert "| step / C step | 1.33 | <= 1.5x | yes |" in report
    assert "edgeseq bench m.onnx" in report
    assert (
        "| streams | numba pool | onnxruntime pool | numpy pool | ONNX Runtime batch run() |"
        in report
    )
    assert "| 1,024 | 200,000 | 90,000 | 30,000 | 100,000 |" in report
    assert "; onnxruntime backend 0.50 s, 90 MiB." in report


def test_rewriting_the_speed_report_keeps_the_daemon_load_section(tmp_path):
    from edgeseq.bench.loadgen.section import LOAD_HEADING, keep_load_section

    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# old speed report\n\n{LOAD_HEADING}\n\n| 1 | 4,581 |\n")
    merged = keep_load_section(path, markdown([_figures(4.0)], "edgeseq bench m.onnx"))
    assert "old speed report" not in merged
    assert "| numba | 4.00 | 8.00 |" in merged and merged.endswith(
        f"{LOAD_HEADING}\n\n| 1 | 4,581 |\n"
    )
    assert keep_load_section(tmp_path / "missing.md", "# report\n") == "# report\n"


def test_a_file_without_edgeseq_metadata_is_benchmarked_on_the_backends_that_stream_it(tmp_path):
    """onnxruntime needs edgeseq's state metadata to carry state: bench leaves it out, not crash."""
    import onnx

    proto = onnx.load(ROOT / "export" / "pump-rnn.onnx")
    del proto.metadata_props[:]
    onnx.save(proto, tmp_path / "plain.onnx")
    assert list(streaming_backends(tmp_path / "plain.onnx")) == ["numpy"]
    assert list(streaming_backends(ROOT / "export" / "pump-rnn.onnx")) == ["onnxruntime", "numpy"]


def test_the_load_generator_does_not_map_numba_s_llvm_beside_the_daemon_it_measures():
    """A process that maps LLVM shares its pages with the daemon, which then cannot page them
    out, and `edgeseq loadtest` read the daemon 35 MiB heavier than it runs alone (164 against
    128 MiB, pump LSTM); what the load test imports must leave Numba and llvmlite alone."""
    import subprocess
    import sys

    code = (
        "import sys, edgeseq.cli.app, edgeseq.bench.loadgen.run\n"
        "print(sorted(m for m in ('numba', 'llvmlite') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_speed_targets_set_for_the_bench_models_do_not_apply_to_others():
    """edgeseq bench on the README's pump model: its speed ratios are shown, not judged."""
    figures = dict(_figures(4.0), model="pump-lstm.onnx")
    figures["c_step_us"] = 1.0  # step / C step 4.0: would fail the bench models' target
    report = markdown([figures], "edgeseq bench pump-lstm.onnx")
    assert "| step / C step | 4.00 | <= 1.5x | n/a (set for export/bench-*.onnx) |" in report
    assert "| first prediction, cold cache (s) | 20.00 | <= 10 | **no** |" in report
