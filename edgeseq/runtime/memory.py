"""Give back the compiler's memory once the kernels are loaded.

LLVM (inside llvmlite's shared library) touches some 70 MB of its own code pages while Numba
initialises and loads the cached kernels; a serving process never runs that code again until it
compiles something new. Those pages are clean and file-backed, so the kernel can drop them from
this process's resident set at no risk: `madvise(MADV_PAGEOUT)` asks it to, and any page that
is needed later (a model reload that compiles) is read back on demand. On a 512 MB board that
is the difference between fitting and not. Linux 5.4+ only; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import sys

MADV_PAGEOUT = 21
LIBRARY = "libllvmlite"


def release_compiler_pages() -> int:
    """Ask the OS to reclaim LLVM's resident pages; how many mappings it accepted."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            regions = [line.split() for line in maps if LIBRARY in line]
    except (OSError, AttributeError):
        return 0
    accepted = 0
    for fields in regions:
        start, end = (int(part, 16) for part in fields[0].split("-"))
        accepted += madvise(start, end - start, MADV_PAGEOUT) == 0
    return accepted
