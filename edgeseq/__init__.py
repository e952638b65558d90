"""edgeseq: recurrent sequence models (RNN, LSTM, GRU) from PyTorch to ONNX to a streaming runtime.

The package root never imports torch: the training side lives in `edgeseq.data`,
`edgeseq.train` and `edgeseq.export`, which are imported explicitly by whoever needs them. The
layout, stage by stage, is docs/architecture.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgeseq.errors import (
    CheckpointError,
    DataError,
    EdgeseqError,
    ModelFormatError,
    ShapeError,
    UsageError,
)
from edgeseq.version import __version__

if TYPE_CHECKING:  # for type checkers; at run time these import lazily (below)
    from edgeseq.runtime import Model, Stream, StreamPool, load

_RUNTIME = {"load", "Model", "Stream", "StreamPool"}


def __getattr__(name: str) -> object:
    """`edgeseq.load` and friends import the runtime (numba, onnx) on first use only, so that
    `import edgeseq` stays instant for the CLI's --help."""
    if name in _RUNTIME:
        from edgeseq import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'edgeseq' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "DataError",
    "EdgeseqError",
    "Model",
    "ModelFormatError",
    "ShapeError",
    "Stream",
    "StreamPool",
    "UsageError",
    "__version__",
    "load",
]
