"""edgeseq: recurrent sequence models (RNN, LSTM, GRU) from PyTorch to ONNX to a streaming runtime.

The package root never imports torch: the training side lives in `edgeseq.train`, `edgeseq.nn`
and `edgeseq.export`, which are imported explicitly by whoever needs them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from edgeseq.errors import (
    CheckpointError,
    DataError,
    EdgeseqError,
    ModelFormatError,
    ShapeError,
    UsageError,
)

try:
    __version__ = version("edgeseq")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = [
    "CheckpointError",
    "DataError",
    "EdgeseqError",
    "ModelFormatError",
    "ShapeError",
    "UsageError",
    "__version__",
]
