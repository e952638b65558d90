"""Graphs edgeseq did not write: torch.onnx.export's (TorchScript and dynamo) and hand-written ONNX.

The runtime must accept them "regardless of who produced the file": `run` equals ONNX Runtime
on the same file, and streaming one sample at a time equals the whole-sequence forward.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import edgeseq
from edgeseq.errors import ModelFormatError

TOLERANCE = 1e-5  # float32 parity with ONNX Runtime and PyTorch (issue 4)
FEATURES, HIDDEN, OUTPUTS = 3, 8, 2
BATCH, STEPS = 2, 5  # the torch exports' example input; dynamo may freeze STEPS into the graph
SPEC_HIDDEN, SPEC_STEPS = 4, 6


def _ort(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _assert_outputs(got: dict[str, np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for (name, value), want in zip(got.items(), expected, strict=True):
        np.testing.assert_allclose(value, want, rtol=0, atol=TOLERANCE, err_msg=name)


# --- torch.onnx.export -------------------------------------------------------------------------


class Recurrent(nn.Module):
    """An nn.RNN/LSTM/GRU and an nn.Linear head; forward(x) starts from zeros."""

    def __init__(self, cell: str, layers: int, batch_first: bool) -> None:
        super().__init__()
        self.rnn = getattr(nn, cell)(FEATURES, HIDDEN, layers, batch_first=batch_first)
        self.head = nn.Linear(HIDDEN, OUTPUTS)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


class WithState(Recurrent):
    def forward(self, x, h0):
        y, h = self.rnn(x, h0)
        return self.head(y), h


class WithCellState(Recurrent):
    def forward(self, x, h0, c0):
        y, (h, c) = self.rnn(x, (h0, c0))
        return self.head(y), h, c


@dataclass(frozen=True)
class Export:
    cell: str
    layers: int
    batch_first: bool
    state: bool  # forward(x, h0[, c0]) returning the state too, else forward(x)
    dynamo: bool = False
    named_axes: bool = True  # False: dynamic_axes as lists, so the dims get meaningless names

    def __str__(self) -> str:
        exporter = "dynamo" if self.dynamo else "torchscript"
        order = "batch_first" if self.batch_first else "time_first"
        io = "state_io" if self.state else "x_only"
        axes = "" if self.named_axes else "-unnamed_axes"
        return f"{self.cell.lower()}-{exporter}-{self.layers}layers-{order}-{io}{axes}"

    @property
    def n_state(self) -> int:
        return (2 if self.cell == "LSTM" else 1) if self.state else 0


VARIANTS = [(True, False), (True, True), (False, False), (False, True)]  # batch_first, state io
TORCHSCRIPT = [Export(c, 1 + i, *v) for c in ("RNN", "LSTM", "GRU") for i, v in enumerate(VARIANTS)]
DYNAMIC_DYNAMO = [Export("LSTM", 1, True, False, dynamo=True), Export("GRU", 2, True, True, True)]
# dynamo unrolls nn.RNN into per-step MatMuls and writes time-first LSTM/GRU with a Reshape to
# the traced length: the time axis cannot be dynamic, so these are exported (and run) at STEPS.
FIXED_TIME_DYNAMO = [Export("RNN", 2, True, True, True), Export("LSTM", 2, False, True, True)]
UNNAMED_AXES = Export("GRU", 1, False, False, named_axes=False)


def _export(case: Export, folder: Path) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    kind = WithCellState if case.n_state == 2 else WithState if case.state else Recurrent
    module = kind(case.cell, case.layers, case.batch_first).eval()
    x_shape = (BATCH, STEPS, FEATURES) if case.batch_first else (STEPS, BATCH, FEATURES)
    args = (torch.zeros(x_shape), *[torch.zeros(case.layers, BATCH, HIDDEN)] * case.n_state)
    names, path = ["x", "h0", "c0"][: 1 + case.n_state], folder / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer chatter
        if case.dynamo:
            batch, time = torch.export.Dim("batch", max=64), torch.export.Dim("time", max=4096)
            x_axes = {0: batch} if case in FIXED_TIME_DYNAMO else {0: batch, 1: time}
            x_axes = x_axes if case.batch_first else {1 - k: v for k, v in x_axes.items()}
            shapes = (x_axes, *[{1: batch}] * case.n_state)
            torch.onnx.export(module, args, path, dynamo=True, dynamic_shapes=shapes)
        else:
            x_axes = {0: "batch", 1: "time"} if case.batch_first else {0: "time", 1: "batch"}
            axes = {"x": x_axes if case.named_axes else [0, 1]}
            axes |= {name: {1: "batch"} for name in names[1:]}
            torch.onnx.export(module, args, path, dynamo=False, input_names=names,
                              dynamic_axes=axes, opset_version=17)  # fmt: skip
    return path, module


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache: dict[Export, tuple[Path, nn.Module]] = {}

    def get(case: Export) -> tuple[Path, nn.Module]:
        if case not in cache:
            cache[case] = _export(case, tmp_path_factory.mktemp(str(case)))
        return cache[case]

    return get


def _torch_feeds(case: Export, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x_shape = (batch, STEPS, FEATURES) if case.batch_first else (STEPS, batch, FEATURES)
    feeds = {"x": rng.standard_normal(x_shape).astype(np.float32)}
    for name in ["h0", "c0"][: case.n_state]:
        feeds[name] = rng.standard_normal((case.layers, batch, HIDDEN)).astype(np.float32)
    return feeds


def _check_torch_export(case: Export, path: Path, module: nn.Module) -> None:
    """run() equals ONNX Runtime on random inputs; stepping equals torch from a zero state."""
    model = edgeseq.load(path)
    data = path.with_suffix(".onnx.data").exists()
    print(f"{case}: plan={model.plan is not None} ({model.plan_note}); external data: {data}")
    feeds = _torch_feeds(case, BATCH)
    _assert_outputs(model.run(feeds), _ort(path, feeds))
    x = _torch_feeds(case, 1, seed=1)["x"]
    with torch.no_grad():
        y = module(torch.from_numpy(x), *[torch.zeros(case.layers, 1, HIDDEN)] * case.n_state)
    expected = (y[0] if case.state else y).numpy().reshape(STEPS, OUTPUTS)
    stream = model.stream()
    got = np.stack([stream.step(sample) for sample in x.reshape(STEPS, FEATURES)])
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("case", [*TORCHSCRIPT, *DYNAMIC_DYNAMO], ids=str)
def test_a_torch_export_runs_like_onnx_runtime_and_streams_like_torch(case, exported):
    _check_torch_export(case, *exported(case))


@pytest.mark.parametrize(
    "case",
    [c for c in TORCHSCRIPT if c.batch_first],
    ids=str,
)
def test_plain_torchscript_exports_with_batch_first_get_the_fused_plan(case, exported):
    model = edgeseq.load(exported(case)[0])
    assert model.plan is not None, model.plan_note


def test_a_time_first_export_with_unnamed_dynamic_axes_streams_like_torch(exported):
    _check_torch_export(UNNAMED_AXES, *exported(UNNAMED_AXES))


@pytest.mark.parametrize("case", FIXED_TIME_DYNAMO, ids=str)
def test_a_dynamo_export_with_a_fixed_time_axis_runs_at_its_length_and_refuses_to_stream(
    case, exported
):
    path, _ = exported(case)
    model = edgeseq.load(path)
    feeds = _torch_feeds(case, BATCH)
    _assert_outputs(model.run(feeds), _ort(path, feeds))
    with pytest.raises(ModelFormatError, match=r"(?i)time|step|stream"):
        model.stream()


# --- many-to-one: the head reads the last step (y[:, -1]) or the final state (hn[-1]) -----------

SELECTIONS = {  # how a many-to-one model picks what its head reads
    "last_step": lambda y, h, bf: y[:, -1] if bf else y[-1],  # Gather(-1) on the time axis
    "last_step_kept": lambda y, h, bf: y[:, -1:] if bf else y[-1:],  # Slice(-1:)
    "final_state": lambda y, h, bf: h[-1],  # Y_h; with layers, Concat of each layer's, Gather(-1)
}
OFF_PATTERN = {  # the same ops on another axis, or before the recurrent layer: not per-sample
    "last_sequence_of_batch": lambda y, h, bf: y[-1:] if bf else y[:, -1:],  # other shapes
    "newest_sample_only": lambda y, h, bf: y,  # x[:, -1:] in forward: same shapes, other values
}


class ManyToOne(nn.Module):
    def __init__(self, cell: str, layers: int, batch_first: bool, select: str) -> None:
        super().__init__()
        self.rnn = getattr(nn, cell)(FEATURES, HIDDEN, layers, batch_first=batch_first)
        self.head = nn.Linear(HIDDEN, OUTPUTS)
        self.batch_first, self.select = batch_first, {**SELECTIONS, **OFF_PATTERN}[select]

        self.newest_only = select == "newest_sample_only"

    def forward(self, x):
        if self.newest_only:  # the recurrent layer sees one sample: no memory at all
            x = x[:, -1:] if self.batch_first else x[-1:]
        y, h = self.rnn(x)
        return self.head(self.select(y, h[0] if isinstance(h, tuple) else h, self.batch_first))


def _export_many_to_one(module: ManyToOne, folder: Path) -> Path:
    bf, path = module.batch_first, folder / "model.onnx"
    x = torch.zeros((BATCH, STEPS, FEATURES) if bf else (STEPS, BATCH, FEATURES))
    axes = {0: "batch", 1: "time"} if bf else {0: "time", 1: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), path, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": axes}, opset_version=17)  # fmt: skip
    return path


_DYNAMO_EXPORT = """
import sys, torch
from tests.runtime.test_runtime_graphs import BATCH, FEATURES, STEPS, ManyToOne
cell, layers, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
module = ManyToOne(cell, layers, True, "last_step").eval()
module.load_state_dict(torch.load(folder + "/weights.pt"))
batch, time = torch.export.Dim("batch", max=64), torch.export.Dim("time", max=4096)
torch.onnx.export(module, (torch.zeros(BATCH, STEPS, FEATURES),), folder + "/model.onnx",
                  dynamo=True, dynamic_shapes=({0: batch, 1: time},))
"""


def _dynamo_export_many_to_one(module: ManyToOne, cell: str, layers: int, folder: Path) -> Path:
    """torch.onnx.export(dynamo=True) in a fresh process: torch 2.13 freezes the time axis of
    the second export of an nn.LSTM (or GRU) in a process to the example's length."""
    torch.save(module.state_dict(), folder / "weights.pt")
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", _DYNAMO_EXPORT, cell, str(layers), str(folder)],
                   cwd=root, check=True, capture_output=True, timeout=300)  # fmt: skip
    return folder / "model.onnx"


def _windows_like_torch(model: edgeseq.Model, module: ManyToOne) -> None:
    """Sample t's answer is the model's output for the window x[:t+1] (at its last step, for a
    model that answers every step), whatever the plan."""
    x = np.random.default_rng(3).standard_normal((STEPS, FEATURES)).astype(np.float32)
    stream = model.stream()
    got = np.stack([stream.step(sample) for sample in x]).reshape(STEPS, -1)
    with torch.no_grad():
        expected = [module(torch.from_numpy(x[None, : t + 1] if module.batch_first
                                            else x[: t + 1, None])).numpy().reshape(-1)
                    [-model.n_outputs :] for t in range(STEPS)]  # fmt: skip
    np.testing.assert_allclose(got, np.stack(expected), rtol=0, atol=TOLERANCE)


MANY_TO_ONE = [("LSTM", 2, True, "last_step"), ("GRU", 1, False, "last_step"),
               ("RNN", 2, False, "last_step_kept"), ("LSTM", 1, True, "final_state"),
               ("GRU", 2, False, "final_state"), ("RNN", 1, True, "final_state")]  # fmt: skip


@pytest.mark.parametrize("cell, layers, batch_first, select", MANY_TO_ONE)
def test_a_many_to_one_export_gets_the_fused_plan_and_answers_each_window(
    cell, layers, batch_first, select, tmp_path
):
    torch.manual_seed(1)
    module = ManyToOne(cell, layers, batch_first, select).eval()
    path = _export_many_to_one(module, tmp_path)
    model = edgeseq.load(path)
    assert model.plan is not None, model.plan_note
    assert model.n_outputs == OUTPUTS
    _windows_like_torch(model, module)
    feeds = {
        "x": np.random.default_rng(4)
        .standard_normal((BATCH, STEPS, FEATURES) if batch_first else (STEPS, BATCH, FEATURES))
        .astype(np.float32)
    }
    _assert_outputs(model.run(feeds), _ort(path, feeds))


def test_a_dynamo_many_to_one_export_gets_the_fused_plan(tmp_path):
    torch.manual_seed(2)
    module = ManyToOne("LSTM", 1, True, "last_step").eval()
    model = edgeseq.load(_dynamo_export_many_to_one(module, "LSTM", 1, tmp_path))
    assert model.plan is not None, model.plan_note
    _windows_like_torch(model, module)


@pytest.mark.parametrize("select", OFF_PATTERN)
def test_selecting_on_another_axis_is_refused_by_the_plan_and_still_streams_right(select, tmp_path):
    torch.manual_seed(3)
    module = ManyToOne("LSTM", 1, True, select).eval()
    model = edgeseq.load(_export_many_to_one(module, tmp_path))
    assert model.plan is None, model.plan_note
    cause = {"last_sequence_of_batch": "holds neither", "newest_sample_only": "differs"}[select]
    assert cause in model.plan_note
    if select == "newest_sample_only":  # the graph path streams it as exported
        _windows_like_torch(model, module)


# --- graphs written against the ONNX operator spec ---------------------------------------------


def _info(name: str, dims: list, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, dims)


HEADS = {  # after the recurrent node: Y [T, 1, B, H] or Y_h [1, B, H] -> "d", and output rank
    "matmul": ([("Squeeze", ["Y", "one"], "s"), ("MatMul", ["s", "Wd"], "m"),
                ("Add", ["m", "bd"], "d")], 3),
    "gemm": ([("Squeeze", ["Y_h", "zero"], "s"), ("Gemm", ["s", "Wg", "bd"], "d")], 2),
    "flat-gemm": ([("Squeeze", ["Y", "one"], "s"), ("Reshape", ["s", "flat"], "f"),
                   ("Gemm", ["f", "Wg", "bd"], "d")], 2),
}  # fmt: skip


def _spec_graph(op, direction="forward", layout=0, bias=True, peepholes=False, seq_lens=False,
                init=None, outputs=("Y", "Y_h", "Y_c"), head=None, act=None, **attrs):  # fmt: skip
    """One opset-17 RNN/LSTM/GRU node (+ optional dense head and activation), seeded weights."""
    rng = np.random.default_rng(7)

    def const(name: str, *shape: int, scale: float = 0.5) -> onnx.TensorProto:
        return numpy_helper.from_array(
            np.float32(scale) * rng.standard_normal(shape, np.float32), name
        )

    dirs, h = (2 if direction == "bidirectional" else 1), SPEC_HIDDEN
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[op]
    inits = [const("W", dirs, gates * h, FEATURES), const("R", dirs, gates * h, h)]
    inits += [const("B", dirs, 2 * gates * h)] if bias else []
    inits += [const("P", dirs, 3 * h)] if peepholes else []
    inputs = [_info("X", [*(["time", "batch"] if layout == 0 else ["batch", "time"]), FEATURES])]
    inputs += [_info("sequence_lens", ["batch"], TensorProto.INT32)] if seq_lens else []
    states = ["initial_h", "initial_c"][: 2 if op == "LSTM" else 1]
    for s in states:
        if init == "input":
            inputs.append(_info(s, [dirs, "batch", h] if layout == 0 else ["batch", dirs, h]))
        elif init == "const":  # a learned initial state, batch 1
            inits.append(const(s, *((dirs, 1, h) if layout == 0 else (1, dirs, h)), scale=1.0))
    names = ["X", "W", "R", "B" if bias else "", "sequence_lens" if seq_lens else ""]
    names += [s if init else "" for s in states] + ["P" if peepholes else ""] * (op == "LSTM")
    results = [o if o in outputs else "" for o in ("Y", "Y_h", "Y_c")[: len(states) + 1]]
    nodes = [helper.make_node(op, names, results, hidden_size=h, direction=direction, layout=layout,
                              **attrs)]  # fmt: skip
    outs = [(o, 4 if o == "Y" else 3) for o in results if o]
    if head:
        inits += [const("Wd", h, OUTPUTS), const("Wg", OUTPUTS, h), const("bd", OUTPUTS)]
        inits += [numpy_helper.from_array(np.array(v, np.int64), n)
                  for n, v in (("one", [1]), ("zero", [0]), ("flat", [-1, h]))]  # fmt: skip
        layers, rank = HEADS[head]
        nodes += [helper.make_node(o, i, [r], **({"transB": 1} if o == "Gemm" else {}))
                  for o, i, r in layers]  # fmt: skip
        outs = [("d", rank)]
    if act:
        kw = {"alpha": 0.2} if act == "LeakyRelu" else {"axis": -1} if act == "Softmax" else {}
        nodes.append(helper.make_node(act, ["d"], ["out"], **kw))
        outs = [("out", outs[0][1])]
    graph = helper.make_graph(nodes, "spec", inputs, [_info(n, [None] * r) for n, r in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


ALPHA_BETA = {"activations": ["HardSigmoid", "LeakyRelu", "Softsign"],
              "activation_alpha": [0.3, 0.05], "activation_beta": [0.4]}  # fmt: skip
STREAMABLE = {
    "rnn": {"op": "RNN"},
    "rnn-relu-clip": {"op": "RNN", "activations": ["Relu"], "clip": 0.8},
    "rnn-leakyrelu-alpha": {"op": "RNN", "activations": ["LeakyRelu"], "activation_alpha": [0.3]},
    "rnn-no-bias": {"op": "RNN", "bias": False},
    "gru-linear-before-reset-0": {"op": "GRU", "linear_before_reset": 0},
    "gru-linear-before-reset-1": {"op": "GRU", "linear_before_reset": 1},
    "gru-clip": {"op": "GRU", "clip": 0.5, "linear_before_reset": 1},
    "lstm": {"op": "LSTM"},
    "lstm-peepholes": {"op": "LSTM", "peepholes": True},
    "lstm-input-forget": {"op": "LSTM", "input_forget": 1},
    "lstm-alpha-beta-activations": {"op": "LSTM", **ALPHA_BETA},
    "lstm-clip-peepholes-no-bias": {"op": "LSTM", "clip": 0.4, "peepholes": True, "bias": False},
    "lstm-input-forget-peepholes-clip": {"op": "LSTM", "input_forget": 1, "peepholes": True,
                                         "clip": 0.7},
    "lstm-affine-thresholdedrelu": {"op": "LSTM", "activations": ["Sigmoid", "Affine",
                                    "ThresholdedRelu"], "activation_alpha": [0.8, 0.1],
                                    "activation_beta": [0.2]},
    "gru-hardsigmoid-elu-clip": {"op": "GRU", "activations": ["HardSigmoid", "Elu"],
                                 "activation_alpha": [0.25, 0.7], "activation_beta": [0.45],
                                 "clip": 2.0},
    "rnn-softplus-clip": {"op": "RNN", "activations": ["Softplus"], "clip": 1.0},
    "rnn-scaledtanh": {"op": "RNN", "activations": ["ScaledTanh"], "activation_alpha": [1.5],
                       "activation_beta": [0.6]},
    "lstm-initial-state-inputs": {"op": "LSTM", "init": "input"},
    "lstm-learned-initial-state": {"op": "LSTM", "init": "const"},
    "gru-learned-initial-state": {"op": "GRU", "init": "const"},
    "lstm-layout-1": {"op": "LSTM", "layout": 1},
    "lstm-layout-1-initial-state-inputs": {"op": "LSTM", "layout": 1, "init": "input"},
    "gru-layout-1-learned-initial-state": {"op": "GRU", "layout": 1, "init": "const"},
    "lstm-only-Y": {"op": "LSTM", "outputs": ("Y",)},
    "gru-only-Y_h": {"op": "GRU", "outputs": ("Y_h",)},
    "lstm-only-Y_c": {"op": "LSTM", "outputs": ("Y_c",)},
    "gru-gemm-head-on-Y_h": {"op": "GRU", "head": "gemm", "act": "Tanh"},
    "gru-gemm-head-on-flattened-Y": {"op": "GRU", "head": "flat-gemm"},
    "lstm-matmul-add-head": {"op": "LSTM", "head": "matmul"},
} | {f"rnn-matmul-add-{a.lower()}": {"op": "RNN", "head": "matmul", "act": a}
     for a in ("Relu", "Tanh", "Sigmoid", "Softmax", "LeakyRelu")}  # fmt: skip
RUN_ONLY = {"gru-sequence-lens": {"op": "GRU", "seq_lens": True}}
UNFUSED = {"lstm-only-Y_c", "gru-gemm-head-on-flattened-Y"}  # stream on the graph path


def _params(cases: dict) -> list:
    return [pytest.param(v, id=k) for k, v in cases.items()]


def _reference(spec: dict, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """ONNX Runtime's outputs; it refuses layout 1, so that runs as layout 0 on swapped axes."""
    if spec.get("layout", 0) == 0:
        return _ort(_spec_graph(**spec), feeds)
    swapped = {k: v.swapaxes(0, 1) for k, v in feeds.items()}
    outs = _ort(_spec_graph(**{**spec, "layout": 0}), swapped)
    return [y.transpose(2, 0, 1, 3) if y.ndim == 4 else y.swapaxes(0, 1) for y in outs]


def _saved(spec: dict, tmp_path: Path) -> tuple[onnx.ModelProto, Path]:
    model = _spec_graph(**spec)
    onnx.save(model, tmp_path / "spec.onnx")
    return model, tmp_path / "spec.onnx"


def _spec_feeds(model: onnx.ModelProto, batch: int) -> dict[str, np.ndarray]:
    rng, feeds = np.random.default_rng(3), {}
    for i in model.graph.input:
        dims = [d.dim_value or (SPEC_STEPS if d.dim_param == "time" else batch)
                for d in i.type.tensor_type.shape.dim]  # fmt: skip
        feeds[i.name] = rng.standard_normal(dims).astype(np.float32)
    if "sequence_lens" in feeds:
        feeds["sequence_lens"] = np.array([SPEC_STEPS, 2, 0][:batch], np.int32)
    return feeds


@pytest.mark.parametrize("spec", _params(STREAMABLE | RUN_ONLY))
def test_a_spec_graph_runs_like_onnx_runtime(spec, tmp_path):
    model, path = _saved(spec, tmp_path)
    feeds = _spec_feeds(model, 1 if spec.get("init") == "const" else 3)  # learned: batch 1
    loaded = edgeseq.load(path)
    print(f"{spec}: plan={loaded.plan is not None} ({loaded.plan_note})")
    _assert_outputs(loaded.run(feeds), _reference(spec, feeds))


@pytest.mark.parametrize("spec", _params(STREAMABLE))
def test_streaming_a_spec_graph_equals_onnx_runtime_on_the_whole_sequence(spec, tmp_path):
    """Step t's output is the first graph output after t + 1 samples (its last time step)."""
    _, path = _saved(spec, tmp_path)
    xs = np.random.default_rng(4).standard_normal((SPEC_STEPS, FEATURES)).astype(np.float32)
    stream = edgeseq.load(path).stream()
    got = np.stack([stream.step(x) for x in xs])
    zeros = np.zeros((1, 1, SPEC_HIDDEN), np.float32)
    states = {"initial_h": zeros} | ({"initial_c": zeros} if spec["op"] == "LSTM" else {})
    states = states if spec.get("init") == "input" else {}
    expected = []
    for t in range(SPEC_STEPS):
        prefix = xs[: t + 1, None] if spec.get("layout", 0) == 0 else xs[None, : t + 1]
        expected.append(_reference(spec, {"X": prefix, **states})[0].ravel()[-got.shape[1] :])
    np.testing.assert_allclose(got, np.stack(expected), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("spec", _params({k: v for k, v in STREAMABLE.items() if k not in UNFUSED}))
def test_every_option_of_the_recurrent_operators_streams_on_the_fused_plan(spec, tmp_path):
    """clip, every activation with its alpha and beta, peepholes and input_forget run in the
    *_ANY cells (microseconds a step), not the graph evaluator (hundreds); the streaming test
    above checks their values against ONNX Runtime, this one that they are fused at all (the
    loader's check ran the interpreter; pools run the same cells, test_runtime.py)."""
    _, path = _saved(spec, tmp_path)
    model = edgeseq.load(path)
    assert model.plan is not None, model.plan_note
    xs = np.random.default_rng(5).standard_normal((SPEC_STEPS, FEATURES)).astype(np.float32)
    own = model.stream().feed(xs)
    reference = edgeseq.load(path, backend="numpy").stream().feed(xs)
    np.testing.assert_allclose(own, reference, rtol=0, atol=TOLERANCE)


# A graph with a sequence_lens input streams too: each one-sample call has length 1.
UNSTREAMABLE = {  # id: (spec, what stream() must name)
    f"{op.lower()}-{d}": ({"op": op, "direction": d}, d)
    for op in ("RNN", "GRU", "LSTM")
    for d in ("reverse", "bidirectional")
} | {
    "gru-reverse-sequence-lens": ({"op": "GRU", "direction": "reverse", "seq_lens": True},
                                  "reverse"),
}  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "cause"),
    [pytest.param(spec, cause, id=k) for k, (spec, cause) in UNSTREAMABLE.items()],
)  # fmt: skip
def test_graphs_that_need_the_whole_sequence_run_but_refuse_to_stream(spec, cause, tmp_path):
    model, path = _saved(spec, tmp_path)
    feeds = _spec_feeds(model, 3)
    loaded = edgeseq.load(path)
    _assert_outputs(loaded.run(feeds), _ort(model, feeds))
    with pytest.raises(ModelFormatError, match=cause):
        loaded.stream()


# --- graphs the differential fuzzing of session 4 found mishandled ------------------------------


def _rnn_graph(head: list[onnx.NodeProto], out_dims: list, opset: int = 17, h0_dims=None,
               extra: list[onnx.TensorProto] = (), h0_first=False) -> onnx.ModelProto:  # fmt: skip
    """X ['time', 'batch', F] -> RNN (Y as "Y") -> head nodes -> "out"; opset as given."""
    rng = np.random.default_rng(11)
    h = SPEC_HIDDEN
    shapes = {"W": (1, h, FEATURES), "R": (1, h, h), "B": (1, 2 * h)}
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in shapes.items()]  # fmt: skip
    inputs = [_info("X", ["time", "batch", FEATURES])]
    names = ["X", "W", "R", "B"]
    if h0_dims is not None:
        inputs.insert(0 if h0_first else 1, _info("h0", h0_dims))
        names += ["", "h0"]
    rnn = helper.make_node("RNN", names, ["Y"], hidden_size=h)
    graph = helper.make_graph([rnn, *head], "g", inputs, [_info("out", out_dims)],
                              [*inits, *extra])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("opset", [11, 12])
def test_an_opset_11_softmax_without_axis_normalises_over_every_axis_from_1(opset, tmp_path):
    """Before opset 13 Softmax defaults to axis 1 and flattens [1:]: across the batch here."""
    squeeze = helper.make_node("Squeeze", ["Y"], ["s"], axes=[1])
    model = _rnn_graph([squeeze, helper.make_node("Softmax", ["s"], ["out"])],
                       ["time", "batch", SPEC_HIDDEN], opset=opset)  # fmt: skip
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((SPEC_STEPS, 3, FEATURES)).astype(np.float32)
    loaded = edgeseq.load(tmp_path / "m.onnx")
    _assert_outputs(loaded.run({"X": x}), _ort(model, {"X": x}))
    stream = loaded.stream()  # one sample: the softmax covers its H values only
    got = np.stack([stream.step(v) for v in x[:, 0]])
    np.testing.assert_allclose(got, _ort(model, {"X": x[:, :1]})[0][:, 0], rtol=0, atol=TOLERANCE)


def test_an_initial_state_input_with_every_dim_symbolic_is_accepted(tmp_path):
    squeeze = helper.make_node("Squeeze", ["Y", "one"], ["out"])
    one = numpy_helper.from_array(np.array([1], np.int64), "one")
    model = _rnn_graph([squeeze], ["time", "batch", SPEC_HIDDEN], h0_dims=["D", "B", "H"],
                       extra=[one])  # fmt: skip
    onnx.save(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    feeds = {"X": rng.standard_normal((SPEC_STEPS, 3, FEATURES)).astype(np.float32),
             "h0": rng.standard_normal((1, 3, SPEC_HIDDEN)).astype(np.float32)}  # fmt: skip
    loaded = edgeseq.load(tmp_path / "m.onnx")
    _assert_outputs(loaded.run(feeds), _ort(model, feeds))
    assert loaded.stream().step(feeds["X"][0, 0]).shape == (SPEC_HIDDEN,)


def test_a_graph_that_fixes_its_length_inside_runs_at_that_length_and_refuses_to_stream(tmp_path):
    """x declares a dynamic time axis, a Reshape to a constant fixes 4 steps (as dynamo may)."""
    shape = numpy_helper.from_array(np.array([4, -1, SPEC_HIDDEN], np.int64), "shape")
    reshape = helper.make_node("Reshape", ["Y", "shape"], ["out"])
    model = _rnn_graph([reshape], [4, "batch", SPEC_HIDDEN], extra=[shape])
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(2).standard_normal((4, 3, FEATURES)).astype(np.float32)
    loaded = edgeseq.load(tmp_path / "m.onnx")
    _assert_outputs(loaded.run({"X": x}), _ort(model, {"X": x}))
    with pytest.raises(ModelFormatError, match=r"exactly 4 steps .*fixes it"):
        loaded.stream()


def test_the_onnxruntime_backend_refuses_what_onnx_runtime_cannot_run_with_an_edgeseq_error(
    tmp_path,
):
    _, path = _saved({"op": "LSTM", "layout": 1}, tmp_path)  # ORT has no layout 1
    with pytest.raises(ModelFormatError, match=r"ONNX Runtime cannot run .*'numba'"):
        edgeseq.load(path, backend="onnxruntime")
    assert edgeseq.load(path).stream() is not None  # the other backends can


def test_a_graph_that_lists_its_state_input_before_x_streams_x(tmp_path):
    """ONNX does not order inputs; the data input is the one the recurrent node's X comes from."""
    squeeze = helper.make_node("Squeeze", ["Y", "one"], ["out"])
    one = numpy_helper.from_array(np.array([1], np.int64), "one")
    model = _rnn_graph([squeeze], ["time", "batch", SPEC_HIDDEN], h0_dims=[1, "batch", SPEC_HIDDEN],
                       extra=[one], h0_first=True)  # fmt: skip
    assert model.graph.input[0].name == "h0"
    onnx.save(model, tmp_path / "m.onnx")
    loaded = edgeseq.load(tmp_path / "m.onnx")
    assert loaded.n_features == FEATURES
    x = np.random.default_rng(5).standard_normal((SPEC_STEPS, 1, FEATURES)).astype(np.float32)
    zeros = np.zeros((1, 1, SPEC_HIDDEN), np.float32)
    expected = _ort(model, {"h0": zeros, "X": x})[0][:, 0]
    stream = loaded.stream()
    got = np.stack([stream.step(v) for v in x[:, 0]])
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("seq_lens", [False, True], ids=["fused", "graph-path"])
def test_a_node_without_the_optional_hidden_size_takes_it_from_r(op, seq_lens, tmp_path):
    """hidden_size is optional in ONNX (R's shape says it); ONNX Runtime refuses such a graph,
    so the answer to match is edgeseq's on the same graph with the attribute."""
    with_attr = _spec_graph(op, seq_lens=seq_lens, outputs=("Y",))
    without = onnx.ModelProto()
    without.CopyFrom(with_attr)
    attrs = without.graph.node[0].attribute
    attrs.remove(next(a for a in attrs if a.name == "hidden_size"))
    onnx.save(with_attr, tmp_path / "with.onnx")
    onnx.save(without, tmp_path / "without.onnx")
    feeds = _spec_feeds(with_attr, 3)
    xs = feeds["X"][:, 0]
    for backend in ("numba", "numpy"):
        want = edgeseq.load(tmp_path / "with.onnx", backend=backend)
        got = edgeseq.load(tmp_path / "without.onnx", backend=backend)
        _assert_outputs(got.run(feeds), list(want.run(feeds).values()))
        np.testing.assert_allclose(got.stream().feed(xs), want.stream().feed(xs), atol=TOLERANCE)


def test_fixed_sizes_on_x_are_read_along_the_nodes_layout(tmp_path):
    """A spec-written X of [5, 2, F] feeding a layout-0 node is 5 steps of batch 2, whatever
    the (absent) names say: run matches ONNX Runtime, and stream() names the fixed 5 steps."""
    model = _spec_graph("LSTM", outputs=("Y_h",))
    for axis, size in zip(model.graph.input[0].type.tensor_type.shape.dim, (5, 2), strict=False):
        axis.ClearField("dim_param")
        axis.dim_value = size
    onnx.save(model, tmp_path / "static.onnx")
    loaded = edgeseq.load(tmp_path / "static.onnx")
    assert loaded.time_first
    feeds = {"X": np.random.default_rng(6).standard_normal((5, 2, FEATURES)).astype(np.float32)}
    _assert_outputs(loaded.run(feeds), _ort(model, feeds))
    with pytest.raises(ModelFormatError, match="exactly 5 steps"):
        loaded.stream()


def test_peepholes_of_the_wrong_length_are_refused_naming_the_node(tmp_path):
    """P must hold 3 * hidden_size values: the kernels read that many (NumPy broadcasting
    would have let a (1, 3) P through the reference)."""
    model = _spec_graph("LSTM", peepholes=True)
    p = next(t for t in model.graph.initializer if t.name == "P")
    p.CopyFrom(numpy_helper.from_array(np.ones((1, 3), np.float32), "P"))
    onnx.save(model, tmp_path / "p.onnx")
    with pytest.raises(ModelFormatError, match=r"LSTM.*P has shape \(1, 3\); expected \(1, 12\)"):
        edgeseq.load(tmp_path / "p.onnx")


def _pool_equals_streams(path: Path, steps: int = 5, streams: int = 3) -> edgeseq.Model:
    """A numpy-backend pool (one stacked call per step, stacked.py) against separate streams."""
    model = edgeseq.load(path, backend="numpy")
    pool, alone = model.pool(capacity=streams), [model.stream() for _ in range(streams)]
    rng = np.random.default_rng(7)
    for _ in range(steps):
        xs = rng.standard_normal((streams, model.n_features)).astype(np.float32)
        got = pool.step([f"s{i}" for i in range(streams)], xs)
        expected = np.stack([s.step(x) for s, x in zip(alone, xs, strict=True)])
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)
    return model


@pytest.mark.parametrize("case", [*TORCHSCRIPT, *DYNAMIC_DYNAMO, UNNAMED_AXES], ids=str)
def test_a_numpy_pool_of_a_torch_export_steps_in_one_call_like_separate_streams(case, exported):
    stacker = _pool_equals_streams(exported(case)[0])._engine.stacker
    assert stacker.proven, stacker.reason


@pytest.mark.parametrize("spec", _params(STREAMABLE))
def test_a_numpy_pool_of_a_spec_graph_answers_like_separate_streams(spec, tmp_path):
    _, path = _saved(spec, tmp_path)
    stacker = _pool_equals_streams(path)._engine.stacker
    assert stacker.proven, stacker.reason  # layout=1 nodes keep their state batch-first
