"""The streaming runtime: ONNX recurrent models without PyTorch.

`load(path, backend="numba")` -> Model; `model.stream()` -> Stream; `model.pool(n)` -> StreamPool.
"""

from edgeseq.runtime.kernels import compile_notice, kernel_cache

kernel_cache.install()  # before any kernel module is imported: their cache keys depend on it
compile_notice.install()  # a cold cache's compile says so before it starts

from edgeseq.runtime.model import Model, load  # noqa: E402
from edgeseq.runtime.stream import Stream, StreamPool  # noqa: E402

__all__ = ["Model", "Stream", "StreamPool", "load"]
