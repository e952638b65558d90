"""int8 weights for exported models: about 4x smaller weights, checked on the held-out split.

- LSTM: ONNX Runtime's dynamic quantization (`DynamicQuantizeLSTM`, per-channel int8 weights,
  activations quantized on the fly), which covers LSTM and MatMul.
- GRU and Elman RNN (ONNX Runtime has no quantized kernels for them): every recurrent W and R and
  every MatMul/Gemm weight is stored as int8 with one symmetric scale per output channel and
  turned back into float32 by a standard `DequantizeLinear` node at load, so the file stays plain
  ONNX that any runtime opens.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeseq.artifact import sample_feeds, state_shapes
from edgeseq.heldout import Segment
from edgeseq.spec import DataSpec, ModelSpec

INT8_MAX = 127.0


def _per_channel(weights: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 values and the float scale of each slice along `axis`."""
    others = tuple(i for i in range(weights.ndim) if i != axis)
    peak = np.max(np.abs(weights), axis=others)
    scale = np.where(peak > 0, peak / INT8_MAX, 1.0).astype(np.float32)
    shape = [1] * weights.ndim
    shape[axis] = -1
    values = np.clip(np.round(weights / scale.reshape(shape)), -INT8_MAX, INT8_MAX)
    return values.astype(np.int8), scale


def _weight_inputs(model: onnx.ModelProto) -> dict[str, int]:
    """Initializer name -> its output-channel axis, for every weight worth quantizing."""
    initializers = {t.name: t for t in model.graph.initializer}
    found: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("RNN", "GRU", "LSTM"):
            for name in node.input[1:3]:  # W [dirs, gates*H, in], R [dirs, gates*H, H]
                if name in initializers:
                    found[name] = 1
        elif node.op_type in ("MatMul", "Gemm"):
            name = node.input[1]
            if name in initializers and len(initializers[name].dims) == 2:
                found[name] = 1 if node.op_type == "MatMul" else 0  # Gemm here has transB=1
    return found


def dequantize_linear_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace float weights by int8 + per-channel scale + a DequantizeLinear node each."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    targets = _weight_inputs(model)
    kept, added, nodes = [], [], []
    for tensor in model.graph.initializer:
        if tensor.name not in targets:
            kept.append(tensor)
            continue
        values, scale = _per_channel(numpy_helper.to_array(tensor), targets[tensor.name])
        added += [
            numpy_helper.from_array(values, f"{tensor.name}_int8"),
            numpy_helper.from_array(scale, f"{tensor.name}_scale"),
            numpy_helper.from_array(np.zeros_like(scale, np.int8), f"{tensor.name}_zero"),
        ]
        nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{tensor.name}_int8", f"{tensor.name}_scale", f"{tensor.name}_zero"],
                [tensor.name],
                name=f"dequantize_{tensor.name}",
                axis=targets[tensor.name],
            )
        )
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + added)
    old = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + old)
    return model


def ort_dynamic_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's dynamic quantization (per-channel int8), through temporary files.

    Weights use 7 bits (reduce_range): x86 CPUs without VNNI multiply u8 activations by s8
    weights with an int16 pairwise sum that saturates on full 8-bit weights, so the same file
    would give visibly different answers on an AVX2 board than on an AVX-512 VNNI one."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # it advises pre-processing on every call
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, source)
        quantize_dynamic(
            source, target, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True
        )
        return onnx.load(target)


def quantize(model: onnx.ModelProto, spec: ModelSpec) -> onnx.ModelProto:
    return ort_dynamic_int8(model) if spec.cell == "lstm" else dequantize_linear_int8(model)


def _session(model_bytes: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _outputs(session: Any, x: np.ndarray, spec: ModelSpec, data: DataSpec) -> np.ndarray:
    """The graph's y for one segment streamed from a zero state: (T, outputs)."""
    state = {name: np.zeros(shape, np.float32)
             for name, shape in state_shapes(spec, data, 1).items()}  # fmt: skip
    return np.asarray(session.run(["y"], {"x": x[None], **state})[0][0])


def heldout_error(session: Any, segments: list[Segment], spec: ModelSpec, data: DataSpec) -> float:
    """Error on the scored steps: 1 - accuracy (classify), else RMSE in normalized units."""
    if spec.task == "classify":
        hits = [
            int(np.argmax(_outputs(session, s.x, spec, data)[s.mask], axis=1)[-1]
                == s.y[s.mask][-1])
            for s in segments
        ]  # fmt: skip
        return 1.0 - float(np.mean(hits))
    assert data.target_scaling is not None
    repeat = spec.output_size // max(len(data.target_scaling.mean), 1)
    mean = np.tile(np.asarray(data.target_scaling.mean, np.float32), repeat)
    std = np.tile(np.asarray(data.target_scaling.std, np.float32), repeat)
    errors = [
        ((_outputs(session, s.x, spec, data)[s.mask] - mean) / std - s.y[s.mask]).ravel()
        for s in segments
    ]
    return float(np.sqrt(np.mean(np.concatenate(errors) ** 2)))


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def report(
    float_model: onnx.ModelProto,
    int8_model: onnx.ModelProto,
    spec: ModelSpec,
    data: DataSpec,
    segments: list[Segment] | None,
) -> dict[str, Any]:
    """Sizes and the error of both models on the held-out split (or, without one, how far the
    int8 outputs stray from the float ones on random samples, in normalized units)."""
    float_session = _session(float_model.SerializeToString())
    int8_session = _session(int8_model.SerializeToString())
    if segments:
        float_error = heldout_error(float_session, segments, spec, data)
        int8_error = heldout_error(int8_session, segments, spec, data)
        measured_on = f"held-out split ({len(segments)} sequences)"
    else:
        x = sample_feeds(spec, data, 1, 200, seed=2)["x"][0]
        scale = np.asarray(data.target_scaling.std if data.target_scaling else (1.0,), np.float32)
        scale = np.tile(scale, spec.output_size // len(scale))
        diff = (
            _outputs(int8_session, x, spec, data) - _outputs(float_session, x, spec, data)
        ) / scale
        float_error, int8_error = 0.0, float(np.sqrt(np.mean(diff**2)))
        measured_on = "random samples (no held-out split): RMSE of int8 vs float outputs"
    metric = "1 - accuracy" if spec.task == "classify" else "RMSE, normalized units"
    return {
        "scheme": "onnxruntime dynamic (DynamicQuantizeLSTM)" if spec.cell == "lstm"
        else "int8 weights, per-channel scales, DequantizeLinear",
        "metric": metric,
        "measured_on": measured_on,
        "float_error": float_error,
        "int8_error": int8_error,
        "error_growth": int8_error - float_error,
        "float_weight_bytes": _weight_bytes(float_model),
        "int8_weight_bytes": _weight_bytes(int8_model),
    }  # fmt: skip


def int8_model(
    float_model: onnx.ModelProto,
    spec: ModelSpec,
    data: DataSpec,
    segments: list[Segment] | None,
    max_error: float,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The int8 model and its figures; refused when its error grows by more than `max_error`."""
    from edgeseq.errors import ModelFormatError

    model = quantize(float_model, spec)
    onnx.checker.check_model(model)
    figures = report(float_model, model, spec, data, segments) | {"max_error": max_error}
    if figures["error_growth"] > max_error:
        raise ModelFormatError(
            f"int8 export refused: {figures['metric']} on the {figures['measured_on']} grows "
            f"from {figures['float_error']:.4g} to {figures['int8_error']:.4g} "
            f"(+{figures['error_growth']:.4g} > --max-error {max_error:g})"
        )
    return model, figures
