"""A process's resident memory, read from Linux's /proc.

Its own module, importing nothing of edgeseq's runtime: the load generator reads the daemon's
memory through it, and a process that maps Numba's LLVM shares those library pages with the
daemon, which then cannot page them out (MADV_PAGEOUT skips shared pages:
runtime/kernels/compiler_memory.py),
and the daemon's memory reads some 35 MiB higher than when it runs alone.
"""

from __future__ import annotations


def resident_mib(pid: int | str = "self") -> float | None:
    """A process's resident memory in MiB, to 0.1 (Linux's /proc), None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return None
