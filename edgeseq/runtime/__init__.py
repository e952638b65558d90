"""The streaming runtime: ONNX recurrent models without PyTorch.

`load(path, backend="numba")` -> Model; `model.stream()` -> Stream; `model.pool(n)` -> StreamPool.
"""

from edgeseq.runtime.model import Model, load
from edgeseq.runtime.stream import Stream, StreamPool

__all__ = ["Model", "Stream", "StreamPool", "load"]
