"""Export: a trained run (or your own nn.Module) to one verified, self-describing ONNX file.

- onnx_export: `export_checkpoint()` and `to_onnx()`: trace, check the op types, write metadata;
- transform_graph: a target transform's graph pieces around the exported network;
- parity: the proof before writing (ONNX Runtime against PyTorch, whole and streamed);
- quantize: `--quantize int8`, measured on the held-out split as the model is used;
- recipes: `edgeseq replay`: the reference models of export/ from their TOML recipes.

The public names load lazily (`from edgeseq.export import to_onnx`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeseq.export.onnx_export import export_checkpoint, to_onnx

__all__ = ["export_checkpoint", "to_onnx"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from edgeseq.export import onnx_export

        return getattr(onnx_export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
