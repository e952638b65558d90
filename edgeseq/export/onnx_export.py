"""torch -> ONNX: one standard file with state inputs/outputs, scaling in the graph, metadata,
and numbers proven equal to PyTorch's before anything is written.

Graph contract (docs/architecture.md, "The artifact contract"): inputs x [batch, time, features]
in physical units,
h0 [layers, batch, hidden] (and c0 for LSTM); outputs y [batch, time, outputs] in physical units
(class probabilities for classify), hn (and cn). Each recurrent layer is one ONNX RNN/LSTM/GRU
node; a seq2seq model has its decoder's layers as further nodes, run on the context of every step.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from edgeseq.artifact import METADATA_KEY, OPSET, RECURRENT_OPS, build_metadata, op_counts
from edgeseq.errors import ModelFormatError, UsageError
from edgeseq.export.parity import TOLERANCE, prove
from edgeseq.export.quantize import int8_model
from edgeseq.export.transform_graph import Transformed, compose
from edgeseq.spec import DataSpec, ModelSpec, Scaling
from edgeseq.train import heldout
from edgeseq.train import run_checkpoint as checkpoint
from edgeseq.train.heldout import HeldoutSequence

PRIMITIVE_LOOPS = ("Loop", "Scan", "If")
# int8 may raise the held-out error by this much (accuracy points, or normalized RMSE).
DEFAULT_MAX_ERROR = 0.02


class Exportable(nn.Module):
    """Wraps a trained model with the input scaling and output unscaling (or softmax)."""

    in_mean: Tensor
    in_inv_std: Tensor
    out_mean: Tensor
    out_std: Tensor

    def __init__(self, model: nn.Module, spec: ModelSpec, data: DataSpec) -> None:
        super().__init__()
        self.model, self.spec = model.eval(), spec
        f32 = dict(dtype=torch.float32)
        self.register_buffer("in_mean", torch.tensor(data.input_scaling.mean, **f32))  # type: ignore[arg-type]
        self.register_buffer("in_inv_std", 1.0 / torch.tensor(data.input_scaling.std, **f32))  # type: ignore[arg-type]
        out = data.target_scaling
        repeat = spec.horizon if spec.task in ("forecast", "seq2seq") else 1
        mean = torch.tensor(out.mean if out else (0.0,), **f32).repeat(repeat)  # type: ignore[arg-type]
        std = torch.tensor(out.std if out else (1.0,), **f32).repeat(repeat)  # type: ignore[arg-type]
        self.register_buffer("out_mean", mean)
        self.register_buffer("out_std", std)

    def forward(self, x: Tensor, h0: Tensor, c0: Tensor | None = None) -> tuple[Tensor, ...]:
        state = (h0, c0) if c0 is not None else h0
        y, new_state = self.model((x - self.in_mean) * self.in_inv_std, state)
        if self.spec.task == "classify":
            y = torch.softmax(y, dim=-1)
        else:
            y = y * self.out_std + self.out_mean
        if isinstance(new_state, tuple):
            return y, new_state[0], new_state[1]
        return y, new_state


def _trace(wrapper: Exportable, spec: ModelSpec) -> bytes:
    """Export with the TorchScript exporter (dynamo=False), chosen on purpose.

    It maps nn.RNN/LSTM/GRU straight to single ONNX RNN/LSTM/GRU nodes, is byte-for-byte
    deterministic, honours opset 17 and takes a quarter of a second; in torch 2.13 the dynamo
    exporter also emits single recurrent nodes, but forces opset 18 and a version converter, adds
    Shape/Slice glue, and takes seconds per model. The op-type check below catches any regression.
    """
    names = ["x", "h0", "c0"] if spec.has_cell_state else ["x", "h0"]
    outputs = ["y", "hn", "cn"] if spec.has_cell_state else ["y", "hn"]
    state = torch.zeros(spec.num_layers, 1, spec.hidden_size)
    args = (torch.zeros(1, 3, spec.input_size), *([state] * (len(names) - 1)))
    axes = {"x": {0: "batch", 1: "time"}, "y": {0: "batch", 1: "time"}}
    axes |= {n: {1: "batch"} for n in names[1:] + outputs[1:]}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer chatter
        torch.onnx.export(  # a file-like target is accepted by the TorchScript exporter
            wrapper, args, buffer,  # type: ignore[arg-type]
            dynamo=False, input_names=names, output_names=outputs,
            dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True,
        )  # fmt: skip
    return buffer.getvalue()


def check_op_types(model: onnx.ModelProto, spec: ModelSpec) -> dict[str, int]:
    """Refuse graphs where the recurrence was unrolled or turned into a loop."""
    counts = op_counts(model)
    loops = [op for op in PRIMITIVE_LOOPS if op in counts]
    expected_op = spec.cell.upper()
    layers = spec.num_layers * (2 if spec.task == "seq2seq" else 1)
    if (
        loops
        or counts.get(expected_op, 0) != layers
        or any(counts.get(op, 0) for op in RECURRENT_OPS if op != expected_op)
    ):
        raise ModelFormatError(
            f"the exporter did not emit one {expected_op} node per layer ({layers} expected): "
            f"found {counts}; refusing an unrolled or looped recurrence"
        )
    return counts


def _with_metadata(model: onnx.ModelProto, meta: dict[str, Any]) -> bytes:
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta, sort_keys=True)
    model.producer_name, model.producer_version = "edgeseq", str(meta["format_version"])
    model.doc_string = f"edgeseq {meta['task']} model: {meta['output_layout']}"
    return model.SerializeToString(deterministic=True)


SUPPORTED_MODULES = (
    "edgeseq's own models (edgeseq.train.networks.SequenceModel, Seq2SeqModel), or any "
    "nn.Module whose direct "
    "children are exactly one unidirectional nn.RNN/nn.LSTM/nn.GRU (1+ layers, no proj_size) "
    "followed by one nn.Linear head taking its hidden state; its forward must be rnn -> head"
)


def adopt(module: nn.Module, task: str = "regress") -> tuple[nn.Module, ModelSpec]:
    """Rebuild a user's recurrent module as an edgeseq model with the same weights."""
    from edgeseq.train.networks import SequenceModel

    if hasattr(module, "spec") and isinstance(module.spec, ModelSpec):
        return module, module.spec
    children = list(module.named_children())
    kinds = {nn.RNN: "rnn", nn.LSTM: "lstm", nn.GRU: "gru"}
    for name, child in children:
        if not isinstance(child, nn.RNN | nn.LSTM | nn.GRU | nn.Linear):
            raise UsageError(
                f"layer {name!r} ({type(child).__name__}) is not supported; {SUPPORTED_MODULES}"
            )
    if (
        len(children) != 2
        or type(children[0][1]) not in kinds
        or not isinstance(children[1][1], nn.Linear)
    ):
        found = [f"{n}: {type(c).__name__}" for n, c in children]
        raise UsageError(f"module layout {found} is not supported; {SUPPORTED_MODULES}")
    (rnn_name, rnn), (head_name, head) = children
    assert isinstance(rnn, nn.RNNBase) and isinstance(head, nn.Linear)
    if rnn.bidirectional or int(getattr(rnn, "proj_size", 0) or 0):
        raise UsageError(
            f"layer {rnn_name!r}: bidirectional or projected {type(rnn).__name__} cannot stream "
            "one sample at a time; train a unidirectional one"
        )
    if head.in_features != rnn.hidden_size:
        raise UsageError(f"layer {head_name!r} takes {head.in_features} inputs, not the "
                         f"recurrent hidden size {rnn.hidden_size}")  # fmt: skip
    spec = ModelSpec(
        task=task, cell=kinds[type(rnn)], input_size=rnn.input_size, hidden_size=rnn.hidden_size,
        num_layers=rnn.num_layers, output_size=head.out_features,
        n_targets=head.out_features if task != "classify" else 0,
        nonlinearity=str(getattr(rnn, "nonlinearity", "tanh")),
    )  # fmt: skip
    rebuilt = SequenceModel(spec)
    rebuilt.rnn.load_state_dict(rnn.state_dict())
    rebuilt.head.load_state_dict(head.state_dict())
    return rebuilt.eval(), spec


def _default_data_spec(spec: ModelSpec) -> DataSpec:
    n_targets = spec.n_targets
    return DataSpec(
        features=tuple(f"x{i}" for i in range(spec.input_size)),
        targets=tuple(f"y{i}" for i in range(n_targets)),
        labels=tuple(f"class{i}" for i in range(spec.output_size))
        if spec.task == "classify"
        else (),
        input_scaling=Scaling.identity(spec.input_size),
        target_scaling=Scaling.identity(n_targets) if n_targets else None,
    )


def _write_atomically(path: Path, payload: bytes) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o644)  # a model is meant to be copied and read by services
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_onnx(
    model: nn.Module,
    out: str | Path,
    *,
    data: DataSpec | None = None,
    task: str = "regress",
    training: dict[str, Any] | None = None,
    quantize: str | None = None,
    max_error: float = DEFAULT_MAX_ERROR,
    heldout: list[HeldoutSequence] | None = None,
) -> dict[str, Any]:
    """Export `model` to `out` after proving parity; returns the metadata written.

    `data` carries the scaling and names (edgeseq checkpoints have it); without it the scaling is
    the identity. `quantize="int8"` stores int8 weights, refused when the error on `heldout`
    grows by more than `max_error`. Nothing is written unless every check passes.
    """
    if quantize not in (None, "int8"):
        raise UsageError(f"--quantize {quantize!r} is not supported; the choice is int8")
    if max_error < 0:
        raise UsageError(f"--max-error must be >= 0, found {max_error}")
    out = Path(out)
    if not out.parent.is_dir():
        raise UsageError(f"cannot write {out}: folder {out.parent} does not exist")
    model, spec = adopt(model, task)
    data = data or _default_data_spec(spec)
    network = Exportable(model, spec, data).eval()
    wrapper: nn.Module = network
    raw = _trace(network, spec)
    transform = data.target_transform
    if transform is not None:  # the transform's graph pieces around the network's
        joined = compose(onnx.load_from_string(raw), transform, spec.input_size,
                         spec.n_targets, spec.horizon)  # fmt: skip
        raw = joined.SerializeToString(deterministic=True)
        wrapper = Transformed(network, transform, spec.n_targets, spec.horizon).eval()
    check_op_types(onnx.load_from_string(raw), spec)
    parity = prove(wrapper, raw, spec, data)
    worst = max(parity["torch_vs_onnxruntime_full_sequence"],
                parity["onnxruntime_streamed_vs_torch_full_sequence"])  # fmt: skip
    if worst > TOLERANCE:
        raise ModelFormatError(
            f"export refused: ONNX Runtime differs from PyTorch by {worst:.3g} "
            f"(limit {TOLERANCE:g}); figures: {parity}"
        )
    meta = build_metadata(spec, data, training or {}, parity)
    graph = onnx.load_from_string(raw)
    if quantize == "int8":
        meta["float_file_bytes"] = len(_with_metadata(onnx.load_from_string(raw), meta))
        graph, meta["quantization"] = int8_model(graph, spec, data, heldout, max_error,
                                                 lambda m: _with_metadata(m, meta))  # fmt: skip
    _write_atomically(out, _with_metadata(graph, meta))
    return meta


def _training_summary(training: dict[str, Any]) -> dict[str, Any]:
    metrics = training.get("metrics", {})
    return {
        "command": training.get("command", []),
        "config": training.get("config", {}),
        "epochs_run": metrics.get("epochs_run"),
        "best_epoch": metrics.get("best_epoch"),
        "test": metrics.get("test"),
        "baseline": metrics.get("baseline"),
    }


def export_checkpoint(
    source: str | Path,
    out: str | Path,
    *,
    quantize: str | None = None,
    max_error: float = DEFAULT_MAX_ERROR,
) -> dict[str, Any]:
    """Export a training run (its directory or checkpoint.pt) to an ONNX artifact.

    For int8, the run's held-out split (heldout.npz beside the checkpoint) measures the error.
    """
    ckpt = checkpoint.load(source)
    model = ckpt.build()
    run_dir = Path(source) if Path(source).is_dir() else Path(source).parent
    split = heldout.load(run_dir / heldout.FILENAME) if quantize else None
    return to_onnx(
        model, out, data=ckpt.data_spec, training=_training_summary(ckpt.training),
        quantize=quantize, max_error=max_error, heldout=split,
    )  # fmt: skip
