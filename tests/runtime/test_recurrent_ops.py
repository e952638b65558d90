"""The NumPy RNN/GRU/LSTM reference against onnxruntime and onnx's ReferenceEvaluator.

Neither oracle covers the whole spec, so each runs where it is right:
- onnxruntime implements every attribute and input but refuses layout=1 ("Batchwise recurrent
  operations (layout == 1) are not supported"); a layout-1 case runs there as the layout-0 model
  on transposed inputs, outputs transposed back, which is the spec's definition of layout.
  Its RNN kernel, unlike its GRU and LSTM, matches activation names case-sensitively, so RNN
  cases spell them as the spec does; the GRU and LSTM cases check case-insensitivity.
- ReferenceEvaluator (onnx 1.23) runs layout=1 but silently ignores sequence_lens, clip,
  input_forget and GRU/LSTM activations, and its RNN knows only Tanh and Affine (indexing alpha by
  position, applying the first activation to both directions); it is used on the rest.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import ModelProto, TensorProto, helper
from onnx.reference import ReferenceEvaluator

from edgeseq.errors import ModelFormatError
from edgeseq.runtime.graphs import recurrent_ops as ops

ATOL = 1e-5  # float32 runtimes vs the float64 reference (cast to float32), a few steps
OPSET = 17
SEQ, BATCH, INPUT, HIDDEN = 5, 3, 2, 4
CLIP = 0.5  # small enough to bind on standard-normal weights
SEQUENCE_LENS = [2, SEQ, 0]  # partial, full, empty (spec silent; onnxruntime: zero Y_h, Y_c)
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
OURS = {"RNN": ops.rnn, "GRU": ops.gru, "LSTM": ops.lstm}
INPUT_NAMES = ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"]
OUTPUT_NAMES = {"RNN": ["Y", "Y_h"], "GRU": ["Y", "Y_h"], "LSTM": ["Y", "Y_h", "Y_c"]}
DIRECTIONS = ["forward", "reverse", "bidirectional"]

# Non-default activations per direction: (name, alpha, beta), None where the function takes
# none. Functions without alpha or beta sit between ones with them, so that a runtime indexing
# alpha by position instead of consuming it in order would fail; GRU and LSTM mix case.
ACTIVATIONS = {
    "RNN": [[("LeakyRelu", 0.1, None)], [("ScaledTanh", 0.8, 1.2)]],
    "GRU": [[("HardSigmoid", 0.3, 0.4), ("Softsign", None, None)],
            [("sigmoid", None, None), ("Elu", 0.7, None)]],
    "LSTM": [[("HardSigmoid", 0.25, 0.45), ("Affine", 0.5, 0.1), ("ThresholdedRelu", 0.05, None)],
             [("Sigmoid", None, None), ("softplus", None, None), ("Relu", None, None)]],
}  # fmt: skip
COMMON = ["bias", "initial_state", "sequence_lens", "clip", "activations"]
SPECIFIC = {"RNN": [], "GRU": ["linear_before_reset"], "LSTM": ["peepholes", "input_forget"]}
# What ReferenceEvaluator implements (see the module docstring).
REFERENCE_EVALUATOR = {"bias", "initial_state", "linear_before_reset", "peepholes"}


def _cases(op: str) -> list[tuple[str, ...]]:
    """No feature, each feature alone, then all of them together."""
    features = COMMON + SPECIFIC[op]
    return [(), *((f,) for f in features), tuple(features)]


GRID = [
    pytest.param(
        op, direction, layout, features, id="-".join([op, direction, str(layout), *features])
    )
    for op in GATES
    for direction, layout in itertools.product(DIRECTIONS, [0, 1])
    for features in _cases(op)
]


def _case(
    op: str, direction: str, layout: int, features: tuple[str, ...], rng: np.random.Generator
) -> tuple[list[np.ndarray | None], dict[str, Any]]:
    """Inputs in ONNX order (None where absent) and attributes for one grid cell."""
    nd, g = (2 if direction == "bidirectional" else 1), GATES[op]

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    state = (nd, BATCH, HIDDEN) if layout == 0 else (BATCH, nd, HIDDEN)
    inputs: list[np.ndarray | None] = [
        normal(SEQ, BATCH, INPUT) if layout == 0 else normal(BATCH, SEQ, INPUT),
        normal(nd, g * HIDDEN, INPUT),
        normal(nd, g * HIDDEN, HIDDEN),
        normal(nd, 2 * g * HIDDEN) if "bias" in features else None,
        np.array(SEQUENCE_LENS, np.int32) if "sequence_lens" in features else None,
        normal(*state) if "initial_state" in features else None,
    ]
    if op == "LSTM":
        inputs.append(normal(*state) if "initial_state" in features else None)
        inputs.append(normal(nd, 3 * HIDDEN) if "peepholes" in features else None)
    attrs: dict[str, Any] = {"hidden_size": HIDDEN, "direction": direction, "layout": layout}
    if "clip" in features:
        attrs["clip"] = CLIP
    if "activations" in features:
        attrs.update(_activation_attrs(ACTIVATIONS[op][:nd]))
    if "linear_before_reset" in features:
        attrs["linear_before_reset"] = 1
    if "input_forget" in features:
        attrs["input_forget"] = 1
    return inputs, attrs


def _activation_attrs(per_direction: list[list[tuple[str, float | None, float | None]]]) -> dict:
    functions = [f for direction in per_direction for f in direction]
    attrs: dict[str, Any] = {"activations": [name for name, _, _ in functions]}
    alphas = [alpha for _, alpha, _ in functions if alpha is not None]
    betas = [beta for _, _, beta in functions if beta is not None]
    if alphas:
        attrs["activation_alpha"] = alphas
    if betas:
        attrs["activation_beta"] = betas
    return attrs


ELEMENT_TYPES = {"sequence_lens": TensorProto.INT32}  # every other input is float
BATCH_FIRST_IN_LAYOUT_1 = {"X", "initial_h", "initial_c"}


def _model(op: str, inputs: list[np.ndarray | None], attrs: dict[str, Any]) -> ModelProto:
    names = [n if v is not None else "" for n, v in zip(INPUT_NAMES, inputs, strict=False)]
    node = helper.make_node(op, names, OUTPUT_NAMES[op], **attrs)
    inputs_info = [
        helper.make_tensor_value_info(n, ELEMENT_TYPES.get(n, TensorProto.FLOAT), None)
        for n in names
        if n
    ]
    outputs_info = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in OUTPUT_NAMES[op]
    ]
    graph = helper.make_graph([node], op.lower(), inputs_info, outputs_info)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _feeds(inputs: list[np.ndarray | None]) -> dict[str, np.ndarray]:
    return {n: v for n, v in zip(INPUT_NAMES, inputs, strict=False) if v is not None}


def _onnxruntime(op: str, inputs: list[np.ndarray | None], attrs: dict[str, Any]) -> list:
    """Run on onnxruntime; a layout-1 case as layout 0 on transposed tensors (see module doc)."""
    if attrs["layout"] == 1:
        swapped = [
            v.swapaxes(0, 1) if v is not None and n in BATCH_FIRST_IN_LAYOUT_1 else v
            for n, v in zip(INPUT_NAMES, inputs, strict=False)
        ]
        outs = _onnxruntime(op, swapped, {**attrs, "layout": 0})
        return [outs[0].transpose(2, 0, 1, 3), *(s.swapaxes(0, 1) for s in outs[1:])]
    model = _model(op, inputs, attrs)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, _feeds(inputs))


def _reference_evaluator(op: str, inputs: list[np.ndarray | None], attrs: dict[str, Any]) -> list:
    return ReferenceEvaluator(_model(op, inputs, attrs)).run(None, _feeds(inputs))


def _assert_outputs_match(ours: tuple[np.ndarray, ...], expected: list) -> None:
    assert len(ours) == len(expected)
    for name, got, want in zip(["Y", "Y_h", "Y_c"], ours, expected, strict=False):
        assert got.dtype == np.float32, name
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=name)


@pytest.mark.parametrize(("op", "direction", "layout", "features"), GRID)
def test_every_attribute_and_input_matches_onnxruntime(
    op: str, direction: str, layout: int, features: tuple[str, ...], rng: np.random.Generator
) -> None:
    inputs, attrs = _case(op, direction, layout, features, rng)
    expected = _onnxruntime(op, inputs, attrs)
    _assert_outputs_match(OURS[op](*inputs, **attrs), expected)


@pytest.mark.parametrize(
    ("op", "direction", "layout", "features"),
    [p for p in GRID if set(p.values[3]) <= REFERENCE_EVALUATOR],
)
def test_what_the_reference_evaluator_implements_matches_it_including_layout_1(
    op: str, direction: str, layout: int, features: tuple[str, ...], rng: np.random.Generator
) -> None:
    inputs, attrs = _case(op, direction, layout, features, rng)
    expected = _reference_evaluator(op, inputs, attrs)
    _assert_outputs_match(OURS[op](*inputs, **attrs), expected)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_rnn_affine_matches_the_reference_evaluator(
    direction: str, rng: np.random.Generator
) -> None:
    inputs, attrs = _case("RNN", direction, 0, ("bias", "initial_state"), rng)
    attrs.update(activations=["Affine"], activation_alpha=[0.6], activation_beta=[0.2])
    _assert_outputs_match(ops.rnn(*inputs, **attrs), _reference_evaluator("RNN", inputs, attrs))


# The spec's defaults are those of the standalone operators: LeakyRelu 0.01, ThresholdedRelu 1.0,
# HardSigmoid 0.2/0.5, Elu 1.0, Affine 1.0/0.0. onnxruntime uses 0 for ThresholdedRelu and Affine
# (rnn_helpers.cc), so the defaults are given to it explicitly; ScaledTanh has none at all.
SPEC_DEFAULTS: dict[str, tuple[float | None, float | None]] = {
    "Relu": (None, None), "Tanh": (None, None), "Sigmoid": (None, None), "Affine": (1.0, 0.0),
    "LeakyRelu": (0.01, None), "ThresholdedRelu": (1.0, None), "HardSigmoid": (0.2, 0.5),
    "Elu": (1.0, None), "Softsign": (None, None), "Softplus": (None, None),
}  # fmt: skip
OTHER_VALUES = {
    "Affine": (0.7, -0.2), "LeakyRelu": (0.2, None), "ThresholdedRelu": (0.3, None),
    "HardSigmoid": (0.4, 0.6), "Elu": (0.5, None), "ScaledTanh": (1.5, 0.7),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SPEC_DEFAULTS))
def test_every_activation_with_its_default_parameters_matches_onnxruntime(
    name: str, rng: np.random.Generator
) -> None:
    inputs, attrs = _case("GRU", "forward", 0, ("bias",), rng)
    spec_default = _activation_attrs([[("Sigmoid", None, None), (name, *SPEC_DEFAULTS[name])]])
    expected = _onnxruntime("GRU", inputs, {**attrs, **spec_default})
    _assert_outputs_match(ops.gru(*inputs, **attrs, activations=["Sigmoid", name]), expected)


@pytest.mark.parametrize("name", sorted(OTHER_VALUES))
@pytest.mark.parametrize("op", ["RNN", "GRU"])
def test_every_activation_parameter_is_honoured_as_onnxruntime_does(
    op: str, name: str, rng: np.random.Generator
) -> None:
    inputs, attrs = _case(op, "bidirectional" if op == "GRU" else "forward", 0, ("bias",), rng)
    functions = [[(name, *OTHER_VALUES[name])]]
    if op == "GRU":  # alpha and beta consumed across both directions
        functions = [
            [("Sigmoid", None, None), ("Tanh", None, None)],
            [("Sigmoid", None, None), *functions[0]],
        ]
    attrs.update(_activation_attrs(functions))
    _assert_outputs_match(OURS[op](*inputs, **attrs), _onnxruntime(op, inputs, attrs))


def test_a_forward_rnn_takes_the_schemas_two_element_default_as_onnxruntime_does(
    rng: np.random.Generator,
) -> None:
    inputs, attrs = _case("RNN", "forward", 0, ("bias",), rng)
    attrs["activations"] = ["Relu", "Tanh"]  # RNN's schema default is ["Tanh", "Tanh"]
    _assert_outputs_match(ops.rnn(*inputs, **attrs), _onnxruntime("RNN", inputs, attrs))


def test_an_unknown_activation_is_a_model_format_error(rng: np.random.Generator) -> None:
    inputs, attrs = _case("LSTM", "forward", 0, (), rng)
    with pytest.raises(ModelFormatError, match="'Swish'"):
        ops.lstm(*inputs, **attrs, activations=["Sigmoid", "Swish", "Tanh"])
    with pytest.raises(ModelFormatError, match="unknown activation"):
        ops.activation("gelu")


def test_scaled_tanh_without_alpha_and_beta_is_a_model_format_error() -> None:
    with pytest.raises(ModelFormatError, match="activation_alpha"):
        ops.activation("ScaledTanh")


def test_the_wrong_number_of_activations_is_a_model_format_error(rng: np.random.Generator) -> None:
    inputs, attrs = _case("GRU", "forward", 0, (), rng)
    with pytest.raises(ModelFormatError, match="2 per direction"):
        ops.gru(*inputs, **attrs, activations=["Sigmoid", "Tanh", "Tanh"])


@pytest.mark.parametrize("op", sorted(GATES))
def test_clip_changes_the_result_so_the_clip_cases_test_something(
    op: str, rng: np.random.Generator
) -> None:
    inputs, attrs = _case(op, "forward", 0, ("bias",), rng)
    unclipped, clipped = OURS[op](*inputs, **attrs)[0], OURS[op](*inputs, **attrs, clip=CLIP)[0]
    assert np.max(np.abs(unclipped - clipped)) > 100 * ATOL
