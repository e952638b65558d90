"""Numba's cache for the runtime's kernels, keyed on every source they compile from.

Numba keys a cached function on its own file only (the "source stamp" in its index is a hash of
that one file). The runtime's kernels are built from several: `interpreter.py`, `gemm.py` and the
generated per-model kernels inline `cells.py` and `fastmath.py`, so an edit to `fastmath.tanh`,
or an upgrade that changed it, left their cached machine code in use, and a pool stepped with
the old tanh while a fresh stream used the new one.

Here every runtime kernel's stamp also covers the digest of the whole runtime package (every
`.py` file under `edgeseq/runtime/`) and the edgeseq and Numba versions: any change to any of
them makes every cached kernel stale, and Numba compiles it again and overwrites its entry; an
unchanged package finds every entry valid and compiles nothing. The cache stays where Numba
would put it (NUMBA_CACHE_DIR, else `__pycache__` beside the source, else the user's cache
folder), so a board's `/var/cache/edgeseq/numba` keeps working and nothing accumulates.

How: a cache locator (numba.core.caching, in the Numba version pinned in constraints.txt) put
first in Numba's list before any kernel module is imported: `edgeseq.runtime`'s `__init__`
calls `install()` ahead of its other imports, and every runtime module is imported through it.
It claims the functions defined in the runtime's files and in generated kernel files; every
other function in the process is cached as Numba always does.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numba
from numba.core import caching

RUNTIME = Path(__file__).resolve().parents[1]  # edgeseq/runtime, every room of it
GENERATED_PREFIX = "edgeseq_kernel_"  # specialize.py's file names for per-model kernels


@functools.cache
def runtime_digest() -> str:
    """sha256 of the runtime's sources (path and bytes of each), edgeseq's and Numba's versions."""
    from edgeseq.version import __version__

    digest = hashlib.sha256(f"edgeseq {__version__} numba {numba.__version__}\n".encode())
    for path in sorted(RUNTIME.rglob("*.py")):
        digest.update(str(path.relative_to(RUNTIME)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def is_kernel_source(py_file: str) -> bool:
    """Whether a function defined in `py_file` is one of the runtime's kernels."""
    path = Path(py_file)
    if path.name.startswith(GENERATED_PREFIX):
        return True
    try:
        return RUNTIME in path.resolve().parents
    except OSError:
        return False


class _StampedMixin:
    """A locator whose source stamp is the file's own (Numba's) together with the runtime's."""

    def get_source_stamp(self) -> Any:
        return (super().get_source_stamp(), runtime_digest())  # type: ignore[misc]


class _UserProvided(_StampedMixin, caching.UserProvidedCacheLocator):
    pass


class _InTree(_StampedMixin, caching.InTreeCacheLocator):
    pass


class _UserWide(_StampedMixin, caching.UserWideCacheLocator):
    pass


class _Private(_StampedMixin, caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
    """The last resort, when none of Numba's places can be written: a folder of this user's
    in the temporary directory (kept until the machine cleans it)."""

    def __init__(self, py_func: Any, py_file: str) -> None:
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        folder = Path(tempfile.gettempdir()) / f"edgeseq-numba-{os.getuid()}"
        self._cache_path = str(folder / self.get_suitable_cache_subpath(py_file))

    def get_cache_path(self) -> str:
        return self._cache_path


class RuntimeLocator:
    """Numba's own order of places for the runtime's kernels, each with the runtime's stamp;
    None for any other function, which Numba's own locators then place."""

    PLACES = (_UserProvided, _InTree, _UserWide, _Private)

    @classmethod
    def from_function(cls, py_func: Any, py_file: str) -> Any:
        if not is_kernel_source(py_file):
            return None
        for place in cls.PLACES:
            locator = place.from_function(py_func, py_file)
            if locator is not None:
                return locator
        return None


def install() -> None:
    """Put RuntimeLocator first in Numba's list of cache locators (once)."""
    classes = caching.CacheImpl._locator_classes
    if RuntimeLocator not in classes:
        classes.insert(0, RuntimeLocator)  # type: ignore[arg-type]  # Numba calls only from_function
