"""Other processes that map Numba's LLVM beside the daemon under test.

Pages a process shares with the daemon count in the daemon's resident memory, and shared pages
cannot be paged out (edgeseq/daemon/resident.py): with another Numba process running, a daemon of
125 MiB reads some 190. The load test counts such neighbours and says so beside its memory
figure, rather than report a figure that is silently off.
"""

from __future__ import annotations

import os
from collections.abc import Collection

LLVM = "libllvmlite"


def llvm_neighbours(exclude: Collection[int]) -> list[int]:
    """PIDs (other than `exclude`) whose memory maps include llvmlite's LLVM (Linux's /proc)."""
    found = []
    with os.scandir("/proc") as entries:
        for entry in entries:  # one per process of this machine
            if entry.name.isdigit() and int(entry.name) not in exclude and _maps_llvm(entry.path):
                found.append(int(entry.name))
    return sorted(found)


def _maps_llvm(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "maps"), encoding="ascii", errors="replace") as maps:
            return any(LLVM in line for line in maps)
    except OSError:  # gone, or not ours to read
        return False
