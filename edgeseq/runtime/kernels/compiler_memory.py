"""Give back the compiler's memory once the kernels are loaded.

LLVM (inside llvmlite's shared library) touches some 70 MB of its own code pages while Numba
initialises and loads the cached kernels; a serving process never runs that code again until it
compiles something new. Those pages are clean and file-backed, so the kernel can drop them from
this process's resident set at no risk: `madvise(MADV_PAGEOUT)` asks it to, and any page that
is needed later (a model reload that compiles) is read back on demand. On a 512 MB board that
is the difference between fitting and not. Linux 5.4+ only; elsewhere this does nothing.

What compiling itself leaves behind cannot be given back that way: a process that compiled its
kernels (a cold cache: a first start, a new model shape, an upgrade) keeps some 300 MB of
LLVM's live structures (the reference pump LSTM's daemon: 423 to 435 MiB after compiling, 125
MiB when it loads the same kernels from the cache; malloc_trim frees 3 MiB of it). `count_compiles`
tells a long-lived process that this happened, so that it can start afresh on the now warm
cache (the daemon does: edgeseq/daemon/service.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator

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


class CompileCount:
    """How many kernels Numba compiled (rather than loaded from its cache) in a block."""

    def __init__(self) -> None:
        self.count = 0


@contextlib.contextmanager
def count_compiles() -> Iterator[CompileCount]:
    """Counts Numba's compilations inside the block: its "numba:compile" event fires for a real
    compilation only, never for a kernel loaded from the cache (numba/core/dispatcher.py).
    Without Numba (the numpy fallback) nothing compiles and the count stays 0."""
    found = CompileCount()
    try:
        from numba.core import event
    except ImportError:
        yield found
        return

    class Counter(event.Listener):
        def on_start(self, ev: event.Event) -> None:
            found.count += 1

        def on_end(self, ev: event.Event) -> None:
            pass

    counter = Counter()
    event.register("numba:compile", counter)
    try:
        yield found
    finally:
        event.unregister("numba:compile", counter)
