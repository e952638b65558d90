"""Proof before writing: the ONNX graph computes what the PyTorch model computes.

Three checks, each reported in the artifact's metadata:
- PyTorch full sequence vs ONNX Runtime full sequence (several batch rows);
- ONNX Runtime step by step (seq_len 1, state fed back) over 1,000 steps vs PyTorch's full
  sequence, which is what a streaming device does;
- `onnx.checker` with full checking and strict shape inference.
Errors are measured in the model's normalized output units (physical error divided by the
target's training std; class probabilities as they are), so a 1e-5 bound means the same for a
sensor in millivolts and one in kilopascals and stays above float32 resolution.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch

from edgeseq.artifact import output_scale, sample_feeds
from edgeseq.spec import DataSpec, ModelSpec

TOLERANCE = 1e-5  # float32: max abs error allowed (normalized output units)
STREAM_STEPS = 1000


def _torch_run(wrapper: torch.nn.Module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        outs = wrapper(*(torch.from_numpy(v) for v in feeds.values()))
    return [o.numpy() for o in outs]


def prove(
    wrapper: torch.nn.Module, model_bytes: bytes, spec: ModelSpec, data: DataSpec
) -> dict[str, Any]:
    """Run the three checks; return the figures (the caller refuses the export above TOLERANCE)."""
    import onnxruntime as ort

    proto = onnx.load_from_string(model_bytes)
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    scale = output_scale(spec, data)

    feeds = sample_feeds(spec, data, batch=3, steps=64, seed=0)
    expected = _torch_run(wrapper, feeds)
    got = session.run(None, feeds)
    full = max(float(np.max(np.abs(e - g) / (scale if i == 0 else 1.0)))
               for i, (e, g) in enumerate(zip(expected, got, strict=True)))  # fmt: skip

    state = sample_feeds(spec, data, batch=1, steps=STREAM_STEPS, seed=1)
    x = state.pop("x")
    y_full = _torch_run(wrapper, {"x": x, **state})[0][0]
    stepped = np.empty_like(y_full)
    for t in range(STREAM_STEPS):
        out = session.run(None, {"x": x[:, t : t + 1], **state})
        stepped[t] = out[0][0, 0]
        state = dict(zip(state, out[1:], strict=True))
    streamed = float(np.max(np.abs(stepped - y_full) / scale))
    return {
        "tolerance": TOLERANCE,
        "units": "normalized outputs (physical error / target std)",
        "torch_vs_onnxruntime_full_sequence": full,
        "onnxruntime_streamed_vs_torch_full_sequence": streamed,
        "streamed_steps": STREAM_STEPS,
        "onnx_checker": "passed (full_check, strict shape inference)",
        "onnxruntime_version": ort.__version__,
    }
