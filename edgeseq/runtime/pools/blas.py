"""numpy's own OpenBLAS `sgemm`, callable from inside Numba kernels, and its thread count.

Why: a pool step of many LSTM streams is a GEMM per layer plus the gate math. Through
`numpy.matmul`, OpenBLAS runs the GEMMs on its own threads, which spin for a while after each
call, so the gate math that follows cannot use the other cores: a Numba-parallel gate pass after a
BLAS GEMM measured 8 to 16 ms instead of 0.3. Calling `sgemm` single-threaded from inside Numba's
parallel region puts the GEMM, the stacking and the gates on one set of threads, each on its own
share of the streams, which is what ONNX Runtime does with its one thread pool.

The kernels call the symbol `edgeseq_sgemm64`, which this module registers with LLVM at the
address of numpy's ILP64 `cblas_sgemm`. Cached machine code names that symbol rather than an
address, so it stays valid in the next process. Where numpy has no ILP64 OpenBLAS (a distribution's
numpy linked to the system BLAS, Accelerate on macOS), `AVAILABLE` is False and the callers keep
`numpy.matmul`.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.machinery
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SYMBOL = "edgeseq_sgemm64"
ROW_MAJOR, NO_TRANS = 101, 111  # the CBLAS enums

# (sgemm, set threads, get threads, threading model) as numpy's wheels name them: numpy 2 ships
# scipy-openblas, numpy 1.22 to 1.26 their own openblas64_ build
_CANDIDATES = (
    ("scipy_cblas_sgemm64_", "scipy_openblas_set_num_threads64_",
     "scipy_openblas_get_num_threads64_", "scipy_openblas_get_parallel64_"),
    ("cblas_sgemm64_", "openblas_set_num_threads64_", "openblas_get_num_threads64_",
     "openblas_get_parallel64_"),
)  # fmt: skip
_OWN_THREADS = (0, 1)  # openblas_get_parallel: sequential or pthreads; 2, OpenMP, counts threads
# per calling thread, so a count of 1 set here would not hold on Numba's threads


def _numpy_library() -> ctypes.CDLL | None:
    """A handle on numpy's compiled core: looking symbols up through it also searches the
    libraries it links, which is where numpy's OpenBLAS is, whatever its file is called. (numpy
    1.26's `numpy._core._multiarray_umath` is a Python stub over `numpy.core`'s: skip it.)"""
    for name in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            path = str(importlib.import_module(name).__file__)
        except ImportError:
            continue
        if path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
            try:
                return ctypes.CDLL(path)
            except OSError:  # pragma: no cover - a platform that cannot dlopen it again
                return None
    return None  # pragma: no cover


def _find() -> tuple[int, Any, Any] | None:
    """(sgemm's address, set threads, get threads) from the first naming numpy's BLAS has, if
    its threads are its own (not OpenMP's)."""
    library = _numpy_library()
    if library is None:  # pragma: no cover
        return None
    for names in _CANDIDATES:
        if all(hasattr(library, name) for name in names):
            gemm, setter, getter, parallel = (getattr(library, name) for name in names)
            setter.argtypes, setter.restype = [ctypes.c_int], None
            getter.argtypes, getter.restype = [], ctypes.c_int
            parallel.argtypes, parallel.restype = [], ctypes.c_int
            if parallel() not in _OWN_THREADS:
                return None
            address = ctypes.cast(gemm, ctypes.c_void_p).value
            return int(address or 0), setter, getter
    return None


_found = _find()
AVAILABLE = _found is not None and _found[0] != 0

if AVAILABLE:
    import llvmlite.binding as llvm
    from numba import types
    from numba.core.typing import signature

    assert _found is not None
    llvm.add_symbol(SYMBOL, _found[0])
    _set_threads, _get_threads = _found[1], _found[2]
    _i32, _i64, _f32, _ptr = types.int32, types.int64, types.float32, types.CPointer(types.float32)
    sgemm: Any = types.ExternalFunction(
        SYMBOL,
        signature(types.void, _i32, _i32, _i32, _i64, _i64, _i64, _f32, _ptr, _i64, _ptr, _i64,
                  _f32, _ptr, _i64),
    )  # fmt: skip
    """sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc), ILP64."""


_ONE_AT_A_TIME = threading.Lock()  # the count is process-wide: one holder sets and restores it


@contextmanager
def single_threaded() -> Iterator[None]:
    """OpenBLAS on the calling thread only while the body runs (each of Numba's threads calls it
    for its own share), then back to the thread count it had; a no-op without OpenBLAS. Bodies
    run one at a time. Meanwhile numpy's matrix products elsewhere in the process run on one
    thread too."""
    if not AVAILABLE:
        yield
        return
    with _ONE_AT_A_TIME:
        before = int(_get_threads())
        try:
            if before != 1:
                _set_threads(1)
            yield
        finally:
            if before != 1:
                _set_threads(before)


def set_threads(count: int) -> None:
    """OpenBLAS's thread count for the whole process from now on (a no-op without it)."""
    if AVAILABLE:
        with _ONE_AT_A_TIME:
            _set_threads(count)


def threads() -> int:
    """OpenBLAS's thread count now (0 without it)."""
    return int(_get_threads()) if AVAILABLE else 0
