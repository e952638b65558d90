"""Training checkpoints that describe themselves and load without unpickling arbitrary objects.

A checkpoint holds only tensors, numbers, strings, lists and dicts, and is read back with
`torch.load(weights_only=True)`; the ModelSpec, the DataSpec (scaling, column names, labels) and
the training summary are JSON strings inside it, validated on load.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeseq.errors import CheckpointError
from edgeseq.spec import FORMAT_VERSION, DataSpec, ModelSpec
from edgeseq.train.networks import build_model

FORMAT = "edgeseq.checkpoint"  # written into every checkpoint.pt: never renamed


@dataclass
class Checkpoint:
    model_spec: ModelSpec
    data_spec: DataSpec
    weights: dict[str, torch.Tensor]
    training: dict[str, Any]  # summary: config, command, history, metrics
    resume: dict[str, Any] | None = None  # optimizer/schedule/loop state of the last epoch

    def build(self) -> nn.Module:
        """The model with the checkpoint's weights, in eval mode."""
        model = build_model(self.model_spec)
        try:
            model.load_state_dict(self.weights)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise CheckpointError(
                f"checkpoint weights do not fit its model spec: {first}"
            ) from None
        return model.eval()


def save(path: str | Path, ckpt: Checkpoint) -> None:
    """Write atomically: a reader never sees a half-written checkpoint."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_spec": json.dumps(ckpt.model_spec.to_dict()),
        "data_spec": json.dumps(ckpt.data_spec.to_dict()),
        "training": json.dumps(ckpt.training),
        "weights": ckpt.weights,
        "resume": ckpt.resume,
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json(payload: dict[str, Any], key: str, path: Path) -> Any:
    try:
        return json.loads(payload[key])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: checkpoint field {key!r} is missing or not JSON") from None


def load(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint (a file, or a run directory holding checkpoint.pt)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or hostile files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"{path}: not a readable edgeseq checkpoint ({first})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an edgeseq checkpoint (no {FORMAT!r} marker)")
    if payload.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {payload.get('version')!r}; "
            f"this edgeseq reads version {FORMAT_VERSION}"
        )
    weights = payload.get("weights")
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise CheckpointError(f"{path}: checkpoint weights are not a mapping of named tensors")
    ckpt = Checkpoint(
        model_spec=ModelSpec.from_dict(_json(payload, "model_spec", path)),
        data_spec=DataSpec.from_dict(_json(payload, "data_spec", path)),
        weights=weights,
        training=_json(payload, "training", path),
        resume=payload.get("resume"),
    )
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: weight {name!r} holds NaN or infinite values")
    ckpt.build()  # proves the weights fit the spec
    return ckpt
