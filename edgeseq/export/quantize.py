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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeseq.artifact import output_scale, sample_feeds, state_shapes
from edgeseq.spec import DataSpec, ModelSpec
from edgeseq.train.heldout import HeldoutSequence

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


Outputs = Callable[[np.ndarray], np.ndarray]  # one segment's samples (T, F) -> (T, outputs)


def ort_whole_sequence(session: Any, spec: ModelSpec, data: DataSpec) -> Outputs:
    """ONNX Runtime on a whole segment in one run() (what a batch job does)."""
    return lambda x: _outputs(session, x, spec, data)


def streamed(path: Path) -> Outputs:
    """edgeseq's runtime streaming a segment one sample at a time from a fresh state, as a
    board uses the model (Stream.feed: the same numbers as a step per sample)."""
    from edgeseq.runtime import load

    model = load(path)
    return lambda x: model.stream().feed(x)


def heldout_error(outputs: Outputs, segments: list[HeldoutSequence], spec: ModelSpec,
                  data: DataSpec) -> float:  # fmt: skip
    """Error on the scored steps: 1 - accuracy (classify), else RMSE in normalized units."""
    if spec.task == "classify":
        hits = [
            int(np.argmax(outputs(s.x)[s.mask], axis=1)[-1] == s.y[s.mask][-1])
            for s in segments
        ]  # fmt: skip
        return 1.0 - float(np.mean(hits))
    assert data.target_scaling is not None
    repeat = spec.output_size // max(len(data.target_scaling.mean), 1)
    mean = np.tile(np.asarray(data.target_scaling.mean, np.float32), repeat)
    std = np.tile(np.asarray(data.target_scaling.std, np.float32), repeat)
    unit = output_scale(spec, data, use_floor=False)  # the targets' std (levels' if transformed)
    errors = [((outputs(s.x)[s.mask] - (s.y[s.mask] * std + mean)) / unit).ravel()
              for s in segments]  # fmt: skip
    return float(np.sqrt(np.mean(np.concatenate(errors) ** 2)))


def _own_parity(int8_path: Path, session: Any, spec: ModelSpec, data: DataSpec) -> dict[str, Any]:
    """The int8 file's own parity: edgeseq streaming it against ONNX Runtime, one sample at a
    time with the state fed back, and against ONNX Runtime's whole-sequence run() (which
    quantizes activations over the whole sequence: not how a stream runs), normalized."""
    feeds = sample_feeds(spec, data, 1, 200, seed=3)
    x = feeds["x"][0]
    state = {k: v for k, v in feeds.items() if k != "x"}
    stepped = []
    for t in range(len(x)):
        out = session.run(None, {"x": x[None, t : t + 1], **state})
        stepped.append(out[0][0, 0])
        state = dict(zip(state, out[1:], strict=True))
    scale = output_scale(spec, data)
    ours = streamed(int8_path)(x)
    whole = _outputs(session, x, spec, data)
    return {
        "edgeseq_streamed_vs_onnxruntime_streamed": float(np.max(np.abs(ours - stepped) / scale)),
        "onnxruntime_streamed_vs_whole_sequence": float(np.max(np.abs(stepped - whole) / scale)),
        "steps": len(x),
        "units": "normalized outputs (physical error / target std)",
    }


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def report(
    float_model: onnx.ModelProto,
    int8_model: onnx.ModelProto,
    spec: ModelSpec,
    data: DataSpec,
    segments: list[HeldoutSequence] | None,
    described: Callable[[onnx.ModelProto], bytes],
) -> dict[str, Any]:
    """Sizes and the error of both models on the held-out split, each streamed one sample at a
    time through edgeseq's runtime as a board runs it (ONNX Runtime's whole-sequence figures
    beside); without a held-out split, how far the int8 outputs stray from the float ones on
    random samples, in normalized units. `described` makes a model a file edgeseq loads
    (its metadata attached: a target transform needs it)."""
    float_session = _session(float_model.SerializeToString())
    int8_session = _session(int8_model.SerializeToString())
    with tempfile.TemporaryDirectory() as tmp:
        float_path, int8_path = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        float_path.write_bytes(described(float_model))
        int8_path.write_bytes(described(int8_model))
        if segments:
            float_error = heldout_error(streamed(float_path), segments, spec, data)
            int8_error = heldout_error(streamed(int8_path), segments, spec, data)
            whole = {
                "float_error": heldout_error(
                    ort_whole_sequence(float_session, spec, data), segments, spec, data),
                "int8_error": heldout_error(
                    ort_whole_sequence(int8_session, spec, data), segments, spec, data),
            }  # fmt: skip
            measured_on = (f"held-out split ({len(segments)} sequences), streamed one sample "
                           "at a time through edgeseq's runtime")  # fmt: skip
        else:
            x = sample_feeds(spec, data, 1, 200, seed=2)["x"][0]
            diff = (streamed(int8_path)(x) - streamed(float_path)(x)) / output_scale(spec, data)
            float_error, int8_error, whole = 0.0, float(np.sqrt(np.mean(diff**2))), {}
            measured_on = ("random samples (no held-out split), streamed through edgeseq's "
                           "runtime: RMSE of int8 vs float outputs")  # fmt: skip
        parity = _own_parity(int8_path, int8_session, spec, data)
    metric = "1 - accuracy" if spec.task == "classify" else "RMSE, normalized units"
    return {
        "scheme": "onnxruntime dynamic (DynamicQuantizeLSTM)" if spec.cell == "lstm"
        else "int8 weights, per-channel scales, DequantizeLinear",
        "metric": metric,
        "measured_on": measured_on,
        "float_error": float_error,
        "int8_error": int8_error,
        "error_growth": int8_error - float_error,
        "onnxruntime_whole_sequence": whole,
        "parity": parity,
        "float_weight_bytes": _weight_bytes(float_model),
        "int8_weight_bytes": _weight_bytes(int8_model),
    }  # fmt: skip


def int8_model(
    float_model: onnx.ModelProto,
    spec: ModelSpec,
    data: DataSpec,
    segments: list[HeldoutSequence] | None,
    max_error: float,
    described: Callable[[onnx.ModelProto], bytes],
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The int8 model and its figures; refused when its error grows by more than `max_error`."""
    from edgeseq.errors import ModelFormatError

    model = quantize(float_model, spec)
    onnx.checker.check_model(model)
    figures = report(float_model, model, spec, data, segments, described)
    figures["max_error"] = max_error
    if figures["error_growth"] > max_error:
        raise ModelFormatError(
            f"int8 export refused: {figures['metric']} on the {figures['measured_on']} grows "
            f"from {figures['float_error']:.4g} to {figures['int8_error']:.4g} "
            f"(+{figures['error_growth']:.4g} > --max-error {max_error:g})"
        )
    return model, figures
