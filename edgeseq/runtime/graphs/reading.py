"""Reading untrusted ONNX files safely: size limits, decoding errors, external data confined to
the model's own folder, absurd dimensions. Everything wrong becomes a ModelFormatError."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import external_data_helper, helper

from edgeseq.errors import ModelFormatError

MAX_FILE_BYTES = 2 << 30
MAX_TENSOR_ELEMENTS = 1 << 28  # 1 GiB of float32: far beyond any recurrent model


def _external_file(model_dir: Path, tensor: onnx.TensorProto, where: str) -> None:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    candidate = model_dir / location
    if not location or os.path.isabs(location) or ".." in Path(location).parts:
        raise ModelFormatError(
            f"{where}: tensor {tensor.name!r} points outside the model's folder ({location!r})"
        )
    if candidate.is_symlink() or not candidate.is_file():
        raise ModelFormatError(
            f"{where}: external data {location!r} of {tensor.name!r} is missing or a symbolic link"
        )
    if model_dir.resolve() not in candidate.resolve().parents:
        raise ModelFormatError(f"{where}: external data {location!r} resolves outside the folder")
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    expected = int(np.prod(tensor.dims)) * itemsize
    try:
        offset, length = int(info.get("offset", 0)), int(info.get("length", expected))
    except ValueError:
        raise ModelFormatError(f"{where}: external data of {tensor.name!r} has a non-numeric "
                               f"offset or length ({info})") from None  # fmt: skip
    size = candidate.stat().st_size
    if "length" not in info and size - offset != expected:  # onnx reads to the end of the file
        length = size - offset
    if offset < 0 or length != expected or offset + length > size:
        raise ModelFormatError(
            f"{where}: external data of {tensor.name!r} has {length} bytes at offset {offset} in a "
            f"{size}-byte file; the tensor needs {expected}"
        )


def _shown(dims: Any) -> str:
    """Dims as a list, the first 8 only: a file can hold millions."""
    dims = list(dims)
    return str(dims) if len(dims) <= 8 else f"{str(dims[:8])[:-1]}, ... ({len(dims)} dims)]"


def read_model(path: str | Path) -> tuple[onnx.ModelProto, bytes]:
    """Parse and check an ONNX file; returns the model (external data loaded) and its bytes."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise ModelFormatError(f"{where}: no such model file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ModelFormatError(f"{where}: {size} bytes is more than a model file may have")
    raw = path.read_bytes()
    try:
        model = onnx.load_from_string(raw)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelFormatError(
            f"{where}: not a readable ONNX file ({type(exc).__name__})"
        ) from None
    # Every tensor onnx would load: initializers and Constant/attribute tensors, in subgraphs too.
    tensors = list(external_data_helper._get_all_tensors(model))
    for tensor in tensors:
        # A zero size counts as 1: [2^32, 4096, 0] holds nothing, yet its length is 2^32.
        if math.prod(max(d, 1) for d in tensor.dims) > MAX_TENSOR_ELEMENTS or any(
            d < 0 for d in tensor.dims
        ):
            raise ModelFormatError(
                f"{where}: tensor {tensor.name!r} has absurd dims {_shown(tensor.dims)}; expected "
                f"sizes of at least 0 and at most {MAX_TENSOR_ELEMENTS} values in all"
            )
        if external_data_helper.uses_external_data(tensor):
            _external_file(path.parent, tensor, where)
    try:
        if any(external_data_helper.uses_external_data(t) for t in tensors):
            external_data_helper.load_external_data_for_model(model, str(path.parent))
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "invalid"
        raise ModelFormatError(f"{where}: the ONNX checker refuses it ({first})") from None
    return model, raw
