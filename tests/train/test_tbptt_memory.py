"""Truncated BPTT keeps training memory flat however long the recording is.

Each length trains in its own process and reports its peak resident memory at the end of the
epoch. Plain BPTT through the whole recording is measured too, to show the probe does see growth.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Peak memory may differ by this much between lengths (allocator noise, data arrays).
FLAT_MIB = 15.0


def peak_mib(steps: int, mode: str) -> float:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.memory_probe", str(steps), mode],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return float(proc.stdout.strip().splitlines()[-1])


def test_truncated_bptt_memory_does_not_grow_with_the_sequence_length():
    short, long = peak_mib(5_000, "50"), peak_mib(50_000, "50")
    assert abs(long - short) < FLAT_MIB, (short, long)


def test_plain_bptt_memory_grows_with_the_sequence_length_so_the_probe_can_see_growth():
    short, long = peak_mib(5_000, "full"), peak_mib(20_000, "full")
    assert long - short > FLAT_MIB, (short, long)


@pytest.mark.slow
def test_truncated_bptt_over_100000_steps_uses_as_much_memory_as_over_10000():
    short, long = peak_mib(10_000, "50"), peak_mib(100_000, "50")
    print(f"peak RSS: 10,000 steps {short:.1f} MiB, 100,000 steps {long:.1f} MiB")
    assert abs(long - short) < FLAT_MIB, (short, long)
