"""Saying so before the runtime compiles machine code, so a cold start never looks like a hang.

On a cold Numba cache (a new board, the first start after an upgrade, a model of a new shape)
the first prediction waits seconds for LLVM, minutes on a small board. Numba broadcasts a
"numba:compile" event as it starts compiling a function it did not find in its cache (a cache
hit broadcasts nothing); this listener logs one line on `edgeseq.runtime` at the first such
event of each burst of compiles of the runtime's own kernels. The daemon's log shows it as one
of its lines, the command line prints it on stderr (cli/app.py), and a Python program sees it
through `logging` like any other library's messages.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from numba.core import event

from edgeseq import config
from edgeseq.runtime.kernels import kernel_cache

log = logging.getLogger("edgeseq.runtime")
MESSAGE = ("compiling kernels for this CPU, once (kept in the cache for the next start): "
           "a few seconds here, minutes on a small board")  # fmt: skip


class _Notice(event.Listener):
    """Logs MESSAGE when the runtime starts compiling after config.COMPILE_QUIET_AFTER s of not
    compiling."""

    def __init__(self) -> None:
        self.busy = 0  # compiles in progress (one may start another: inlined callees)
        self.last_end = -float("inf")

    def on_start(self, ev: Any) -> None:
        if not _ours(ev):
            return
        if self.busy == 0 and time.monotonic() - self.last_end > config.COMPILE_QUIET_AFTER:
            log.info(MESSAGE)
        self.busy += 1

    def on_end(self, ev: Any) -> None:
        if not _ours(ev):
            return
        self.busy = max(0, self.busy - 1)
        self.last_end = time.monotonic()


def _ours(ev: Any) -> bool:
    """Whether the compiling function is the runtime's (or a generated per-model kernel)."""
    dispatcher = (ev.data or {}).get("dispatcher")
    code = getattr(getattr(dispatcher, "py_func", None), "__code__", None)
    return code is not None and kernel_cache.is_kernel_source(code.co_filename)


_installed: list[_Notice] = []


def install() -> None:
    """Register the listener once per process (edgeseq.runtime's __init__ does)."""
    if not _installed:
        _installed.append(_Notice())
        event.register("numba:compile", _installed[0])
