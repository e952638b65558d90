"""Export: standard ONNX with state I/O, proven equal to PyTorch, reproducible, refusing junk."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgeseq.artifact import load_info
from edgeseq.errors import UsageError
from edgeseq.export.onnx_export import export_checkpoint, to_onnx
from edgeseq.train.pipeline import TrainConfig, train
from tests import toys

ROOT = Path(__file__).resolve().parents[2]
REFERENCE_MODELS = sorted((ROOT / "export").glob("*.onnx"))
TOLERANCE = 1e-5  # float32, as the issue fixes it


def test_there_is_a_reference_model_per_cell_and_per_task_shape():
    specs = [load_info(p)[1].model_spec for p in REFERENCE_MODELS]
    assert {s.cell for s in specs} == {"rnn", "lstm", "gru"}
    assert {s.task for s in specs} == {"forecast", "classify", "regress", "seq2seq", "generate"}


@pytest.mark.parametrize("path", REFERENCE_MODELS, ids=lambda p: p.stem)
def test_reference_models_still_reproduce_their_golden_outputs(path):
    golden = np.load(path.with_suffix(".golden.npz"))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: golden[i.name] for i in session.get_inputs()}
    for out, value in zip(session.get_outputs(), session.run(None, feeds), strict=True):
        np.testing.assert_allclose(value, golden[out.name], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("path", REFERENCE_MODELS, ids=lambda p: p.stem)
def test_reference_models_are_checked_standard_graphs_with_one_node_per_layer(path):
    model, info = load_info(path)
    onnx.checker.check_model(model, full_check=True)
    spec = info.model_spec
    ops = [n.op_type for n in model.graph.node]
    layers = spec.num_layers * (2 if spec.task == "seq2seq" else 1)
    recurrent_ops = {spec.cell.upper(), "DynamicQuantizeLSTM"}  # the latter: int8 LSTM
    assert sum(op in recurrent_ops for op in ops) == layers
    assert not {"Loop", "Scan"} & set(ops)
    parity = info.metadata["parity"]
    assert parity["torch_vs_onnxruntime_full_sequence"] <= TOLERANCE
    assert parity["onnxruntime_streamed_vs_torch_full_sequence"] <= TOLERANCE
    assert parity["streamed_steps"] == 1000
    assert [i.name for i in model.graph.input] == ["x", *(p[0] for p in info.state_pairs)]
    assert [o.name for o in model.graph.output] == ["y", *(p[1] for p in info.state_pairs)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(hidden=8, epochs=2, window=32, target_transform="none")  # levels: x -> y
    train(toys.sine_series(), cfg, run)
    return run


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_exporting_the_same_checkpoint_twice_gives_byte_identical_files(
    run_dir, tmp_path, quantize
):
    export_checkpoint(run_dir, tmp_path / "a.onnx", quantize=quantize)
    export_checkpoint(run_dir, tmp_path / "b.onnx", quantize=quantize)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_the_exported_graph_returns_physical_units(run_dir, tmp_path):
    from edgeseq.train import run_checkpoint as checkpoint

    export_checkpoint(run_dir, tmp_path / "m.onnx")
    ckpt = checkpoint.load(run_dir)
    x = np.sin(np.arange(60) / 3.0).astype(np.float32).reshape(1, 60, 1) * 5 + 10
    h0 = np.zeros((1, 1, 8), np.float32)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x, "h0": h0, "c0": h0})[0]
    scale = ckpt.data_spec.input_scaling
    z = (torch.from_numpy(x) - scale.mean[0]) / scale.std[0]
    with torch.no_grad():
        expected = ckpt.build()(z)[0].numpy() * scale.std[0] + scale.mean[0]
    np.testing.assert_allclose(y, expected, atol=1e-4)


class UserModel(nn.Module):
    def __init__(self, rnn: nn.Module, hidden: int = 12):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


@pytest.mark.parametrize("cell", [nn.RNN, nn.LSTM, nn.GRU])
def test_a_users_own_module_exports_and_matches_its_forward(cell, tmp_path):
    torch.manual_seed(0)
    module = UserModel(cell(3, 12, num_layers=2, batch_first=True)).eval()
    meta = to_onnx(module, tmp_path / "user.onnx")
    x = np.random.default_rng(0).standard_normal((2, 30, 3)).astype(np.float32)
    state = np.zeros((2, 2, 12), np.float32)
    session = ort.InferenceSession(str(tmp_path / "user.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"x": x, "h0": state} | ({"c0": state} if cell is nn.LSTM else {})
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, feeds)[0], expected, atol=TOLERANCE)
    assert meta["model_spec"]["num_layers"] == 2


@pytest.mark.parametrize(
    ("module", "culprit"),
    [
        (UserModel(nn.LSTM(3, 12, batch_first=True, bidirectional=True), 24), "'rnn'"),
        (nn.Sequential(nn.Conv1d(3, 4, 3), nn.Linear(4, 1)), "Conv1d"),
        (
            nn.Sequential(nn.GRU(3, 12), nn.GRU(12, 12), nn.Linear(12, 1)),
            "layout",
        ),
    ],
    ids=["bidirectional", "conv", "two-recurrent"],
)
def test_an_unsupported_module_is_refused_naming_the_layer(module, culprit, tmp_path):
    with pytest.raises(UsageError, match=culprit):
        to_onnx(module, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "edgeseq", *map(str, args)], cwd=cwd, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize(
    "case", ["corrupt", "other-module", "missing-folder", "output-is-a-folder"]
)
def test_bad_export_requests_fail_with_one_line_and_leave_no_file(case, run_dir, tmp_path):
    source, out = run_dir, tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    if case == "corrupt":
        source = tmp_path / "checkpoint.pt"
        source.write_bytes((run_dir / "checkpoint.pt").read_bytes()[:300])
    elif case == "other-module":  # a plain torch checkpoint of some module edgeseq did not make
        source = tmp_path / "checkpoint.pt"
        torch.save(nn.Conv1d(3, 4, 3).state_dict(), source)
    elif case == "missing-folder":
        out = tmp_path / "nowhere" / "m.onnx"
    else:
        out.mkdir()
    proc = _cli("export", source, "-o", out, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert out.is_dir() if case == "output-is-a-folder" else not out.exists()
    assert not list(out.parent.glob(".*.partial")) if out.parent.exists() else True


def test_inspect_prints_metadata_and_json(tmp_path):
    model = REFERENCE_MODELS[0]
    proc = _cli("inspect", model, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    import json

    info = json.loads(proc.stdout)
    assert info["metadata"]["state"][0] == {"input": "h0", "output": "hn"}
    assert info["parameters"] > 0 and info["file_bytes"] == model.stat().st_size
    table = _cli("inspect", model, cwd=tmp_path)
    assert table.returncode == 0 and "parameters" in table.stdout
