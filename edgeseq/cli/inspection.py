"""`edgeseq inspect`: what an ONNX artifact holds, for people (rich tables) and machines (JSON).

Torch-free (onnx and the runtime's graph reader), so it works on the device too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeseq.artifact import METADATA_KEY, op_counts, read_metadata
from edgeseq.runtime.graphs.graph import Graph
from edgeseq.runtime.graphs.reading import read_model


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    shape = value.type.tensor_type.shape
    return [d.dim_param or d.dim_value for d in shape.dim]


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def describe(path: str | Path) -> dict[str, Any]:
    """Inputs, outputs, node types, parameter count, file size and edgeseq metadata, of a file
    that passes the same checks as `edgeseq.load` (a file it refuses is refused here too)."""
    path = Path(path)
    model, _ = read_model(path)
    Graph(model, str(path))  # tensors, ops, domains and attributes, as the runtime reads them
    nodes = op_counts(model)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    has_meta = any(p.key == METADATA_KEY for p in model.metadata_props)
    return {
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "opset": max(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0
        ),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [{"name": v.name, "shape": _dims(v)} for v in model.graph.input],
        "outputs": [{"name": v.name, "shape": _dims(v)} for v in model.graph.output],
        "nodes": nodes,
        "parameters": params,
        "initializer_dtypes": sorted(
            {onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer}
        ),
        "metadata": read_metadata(model, str(path)).metadata if has_meta else None,
    }
