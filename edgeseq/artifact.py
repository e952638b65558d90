"""The exported artifact's self-description: `metadata_props["edgeseq"]` as validated JSON.

Torch-free: the runtime, the daemon and `edgeseq inspect` read artifacts with this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeseq.errors import ModelFormatError
from edgeseq.spec import (
    FORMAT_VERSION,
    JSON_TYPES,
    NAMES,
    TASKS,
    Check,
    DataSpec,
    ModelSpec,
    number,
    optional,
    record,
    refuse,
    text,
)

METADATA_KEY = "edgeseq"
OPSET = 17
RECURRENT_OPS = ("RNN", "LSTM", "GRU")


@dataclass
class ArtifactInfo:
    """What an exported file says about itself."""

    model_spec: ModelSpec
    data_spec: DataSpec
    metadata: dict[str, Any]

    @property
    def state_pairs(self) -> list[tuple[str, str]]:
        return [(p["input"], p["output"]) for p in self.metadata["state"]]


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each op type the graph has."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def sample_feeds(
    spec: ModelSpec, data: DataSpec, batch: int, steps: int, seed: int = 0, state_std: float = 0.0
) -> dict[str, np.ndarray]:
    """Random graph inputs: samples in physical units spread like the training data, and initial
    states (zero, or normal with `state_std`). Parity proofs and golden files both use these.

    With a target transform the target columns move as the training targets did: each value
    is the one `lag` steps back (a season back for a seasonal transform; the mean level at
    first) plus a change spread like the changes the network read, through exp() for log
    transforms, so they stay positive; without a lag, levels spread like the training ones."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((batch, steps, spec.input_size)).astype(np.float32)
    if spec.task == "generate":  # the fixed vector repeats at every step
        z = np.repeat(z[:, :1], steps, axis=1)
    std = np.asarray(data.input_scaling.std, np.float32)
    x = z * std + np.asarray(data.input_scaling.mean, np.float32)
    transform, levels = data.target_transform, data.target_levels
    if transform is not None and levels is not None:
        n, lag = len(data.targets), transform.lag
        v = np.asarray(levels.mean) + z[:, :, :n] * np.asarray(levels.std)
        if lag:  # each value the one `lag` steps back (the mean level at first) plus a change
            change = x[:, :, :n]  # spread like the changes the network read
            for t in range(steps):
                v[:, t] = (v[:, t - lag] if t >= lag else np.asarray(levels.mean)) + change[:, t]
        x[:, :, :n] = np.exp(v) if transform.log else v
    feeds = {"x": x.astype(np.float32)}
    for pair, shape in state_shapes(spec, data, batch).items():
        noise = rng.standard_normal(shape) if state_std else np.zeros(shape)
        feeds[pair] = (state_std * noise).astype(np.float32)
        if pair == LAG_INPUT:  # a state of a stream that has started: flag 1, past levels
            feeds[pair][0] = 1.0 if state_std else 0.0
    return feeds


LAG_INPUT, LAG_OUTPUT = "lag0", "lagn"  # a target transform's past values (spec.TargetTransform)
# With a target transform, the network's own input and output inside the graph
# (transform_graph.py): the runtime fuses the path between them and the transform around it.
X_MODEL, Y_MODEL = "x_model", "y_model"


def state_pairs(spec: ModelSpec, data: DataSpec | None = None) -> list[dict[str, str]]:
    """The graph's state inputs and outputs: h0 -> hn (c0 -> cn for an LSTM), and lag0 -> lagn
    when a target transform keeps past values."""
    pairs = [{"input": "h0", "output": "hn"}]
    if spec.has_cell_state:
        pairs.append({"input": "c0", "output": "cn"})
    if data is not None and data.target_transform is not None and data.target_transform.lag:
        pairs.append({"input": LAG_INPUT, "output": LAG_OUTPUT})
    return pairs


def state_shapes(spec: ModelSpec, data: DataSpec | None, batch: int) -> dict[str, tuple[int, ...]]:
    """Each state input's shape: [layers, batch, hidden]; lag0 is [1 + lag, batch, targets]
    (a row for "primed", 1 once a sample has been seen, then the last `lag` values)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for pair in state_pairs(spec, data):
        if pair["input"] == LAG_INPUT:
            assert data is not None and data.target_transform is not None
            shapes[LAG_INPUT] = (1 + data.target_transform.lag, batch, len(data.targets))
        else:
            shapes[pair["input"]] = (spec.num_layers, batch, spec.hidden_size)
    return shapes


def output_scale(spec: ModelSpec, data: DataSpec, use_floor: bool = True) -> np.ndarray:
    """Each output's unit of error: its target's training std.

    With a target transform the outputs are levels again (v + a change), and float32 holds a
    level to 6e-8 of itself, so the unit is the std of the levels but at least |level| / 8 (and
    |level| * |log level| / 8 for log transforms, whose exp() turns an ulp of log(level) into
    |log level| ulps of the level): the tolerance then stays ~20 float32 ulps above the
    rounding of the level however little the level varies. Without `use_floor`, the plain std
    of the levels: the unit of an error metric rather than of a float32 tolerance."""
    if spec.task == "classify" or data.target_scaling is None:
        return np.ones(spec.output_size, np.float32)
    per_target = np.asarray(data.target_scaling.std, np.float32)
    levels, transform = data.target_levels, data.target_transform
    if transform is not None and levels is not None:
        mean, std = np.asarray(levels.mean), np.asarray(levels.std)
        floor = np.abs(mean) / 8
        if transform.log:  # exp(v): the spread and the rounding near exp(mean)
            floor = np.exp(mean) * np.maximum(1.0, np.abs(mean)) / 8
            std = np.exp(mean) * std
        per_target = np.maximum(std, floor if use_floor else 0.0).astype(np.float32)
    return np.tile(per_target, spec.output_size // max(len(per_target), 1))


def output_layout(spec: ModelSpec, data: DataSpec) -> str:
    """A sentence for humans (and Netron) on what y[b, t, :] holds."""
    if spec.task == "classify":
        return "y[b, t, k] = probability of class labels[k] after the samples up to t"
    if spec.task in ("forecast", "seq2seq"):
        return (
            f"y[b, t, k * {spec.n_targets} + j] = target j at step t + k + 1, "
            f"k < horizon = {spec.horizon}, in physical units"
        )
    if spec.task == "regress":
        return "y[b, t, j] = target j of the sequence, given the samples up to t (final at the end)"
    return "y[b, t, j] = target j at step t of the generated sequence (x[b, t] = the fixed vector)"


def _rate_hz(data: DataSpec) -> float | None:
    """Samples per second, known only when the time column held real dates and times."""
    if data.time_unit == "s" and data.sample_period:
        return 1.0 / data.sample_period
    return None


def build_metadata(
    spec: ModelSpec, data: DataSpec, training: dict[str, Any], parity: dict[str, Any]
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "task": spec.task,
        "model_spec": spec.to_dict(),
        "data_spec": data.to_dict(),
        "feature_names": list(data.features),
        "target_names": list(data.targets),
        "class_labels": list(data.labels),
        "sample_rate_hz": _rate_hz(data),
        "sample_period": data.sample_period,
        "sample_period_unit": "s" if data.time_unit == "s" else f"units of {data.time_col}",
        "state": state_pairs(spec, data),
        "output_layout": output_layout(spec, data),
        "training": training,
        "parity": parity,
    }


POSITIVE = optional(number("null or a positive finite number", lambda v: v > 0))
NONNEGATIVE = number("a finite number >= 0", lambda v: v >= 0)
PARITY_ERRORS = (  # the figures `edgeseq inspect` prints from the export's proof
    "torch_vs_onnxruntime_full_sequence",
    "onnxruntime_streamed_vs_torch_full_sequence",
)


def _parity(value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        refuse(where, "an object", value)
    for key in PARITY_ERRORS:
        if key in value:
            NONNEGATIVE(value[key], f"{where}.{key}")
    return value


DESCRIPTION: dict[str, Check] = {  # every key build_metadata writes that edgeseq reads back
    "model_spec": record(ModelSpec),
    "data_spec": record(DataSpec),
    "task": text(TASKS),
    "feature_names": NAMES,
    "target_names": NAMES,
    "class_labels": NAMES,
    "sample_rate_hz": POSITIVE,
    "sample_period": POSITIVE,
    "sample_period_unit": text(),
    "output_layout": text(),
    "state": lambda value, where: value,  # checked against the model spec below
    "parity": optional(_parity),
}


def _described(meta: dict[str, Any]) -> ArtifactInfo:
    """Check every key of DESCRIPTION; errors name the key path and what was expected."""
    version = meta.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # true == 1 in Python, not here
        refuse("format_version", f"{FORMAT_VERSION}, the format this edgeseq reads", version)
    found = {}
    for key, check in DESCRIPTION.items():
        if key not in meta:
            raise ModelFormatError(f"{key} is missing; expected keys {', '.join(DESCRIPTION)}")
        found[key] = check(meta[key], key)
    spec, data = found["model_spec"], found["data_spec"]
    if len(data.features) != spec.input_size:
        raise ModelFormatError(
            f"data_spec.features names {len(data.features)} columns; expected one per model "
            f"input (model_spec.input_size = {spec.input_size})"
        )
    if meta["state"] != state_pairs(spec, data):
        raise ModelFormatError(
            f"state must be {json.dumps(state_pairs(spec, data))} for cell {spec.cell}, "
            f"found {json.dumps(meta['state'])[:100]}"
        )
    _check_transform(spec, data)
    return ArtifactInfo(spec, data, meta)


def _check_transform(spec: ModelSpec, data: DataSpec) -> None:
    """A target transform belongs to a forecast whose first inputs are its targets, with its
    levels described, and a seasonal one looks back at least as far as it forecasts."""
    transform = data.target_transform
    if transform is None:
        return
    where = f"data_spec.target_transform {transform.name!r}"
    if spec.task not in ("forecast", "seq2seq") or not data.targets:
        raise ModelFormatError(f"{where}: only forecast and seq2seq models with targets have one")
    if tuple(data.features[: len(data.targets)]) != tuple(data.targets):
        raise ModelFormatError(
            f"{where}: the features must start with the targets {list(data.targets)}, "
            f"found {list(data.features)[:8]}"
        )
    if data.target_levels is None:
        raise ModelFormatError(f"{where}: data_spec.target_levels is missing")
    if transform.seasonal and transform.season < spec.horizon:
        raise ModelFormatError(f"{where}: season {transform.season} is shorter than the "
                               f"horizon {spec.horizon}")  # fmt: skip


def read_metadata(model: onnx.ModelProto, where: str) -> ArtifactInfo:
    """Parse and validate the edgeseq metadata of a loaded ONNX model."""
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ModelFormatError(f"{where}: no {METADATA_KEY!r} metadata; not an edgeseq export")
    try:
        meta = json.loads(props[METADATA_KEY])
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays nested 1000s deep
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ModelFormatError(f"{where}: edgeseq metadata is not JSON ({reason})") from None
    if not isinstance(meta, dict):
        kind = JSON_TYPES.get(type(meta), "value")
        raise ModelFormatError(f"{where}: edgeseq metadata must be a JSON object, found {kind}")
    try:
        return _described(meta)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{where}: edgeseq metadata: {exc}") from None


def read_onnx(path: str | Path) -> onnx.ModelProto:
    """Parse an ONNX file (external data untouched), turning every failure into one error."""
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such model file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelFormatError(f"{path}: not a readable ONNX file ({type(exc).__name__})") from None


def load_info(path: str | Path) -> tuple[onnx.ModelProto, ArtifactInfo]:
    model = read_onnx(path)
    return model, read_metadata(model, str(path))
