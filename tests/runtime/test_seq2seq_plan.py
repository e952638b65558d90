"""A seq2seq model on the fused plan (program.LstmDecoder, DenseRows): the decoder that re-reads
the encoder's output `horizon` times runs in the model's own kernel, answering as the graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import edgeseq
from edgeseq.runtime.kernels import program as ir
from tests.pool_checks import assert_pools_step_as_separate_streams

SEQ2SEQ = Path(__file__).resolve().parents[2] / "export" / "sine-seq2seq-lstm.onnx"


def test_the_seq2seq_model_is_fused_and_streams_as_its_graph():
    model = edgeseq.load(SEQ2SEQ)
    assert model.plan is not None, model.plan_note
    kinds = [type(op) for op in model.plan.ops]
    assert kinds == [ir.Affine, ir.Lstm, ir.LstmDecoder, ir.DenseRows, ir.Affine], kinds
    assert len(model.plan.layers) == 1  # the decoder keeps no state between samples
    xs = np.sin(np.linspace(0, 60, 1000, dtype=np.float32))[:, None] + np.float32(0.1)
    fused, graph = model.stream(), edgeseq.load(SEQ2SEQ, backend="numpy").stream()
    got = np.stack([fused.step(x) for x in xs])
    expected = np.stack([graph.step(x) for x in xs])
    assert got.shape == (1000, model.plan.n_outputs) == expected.shape
    assert float((np.abs(got - expected) / (1 + np.abs(expected))).max()) < 1e-5
    np.testing.assert_array_equal(model.stream().feed(xs), got)


def test_seq2seq_pools_answer_as_separate_streams():
    assert_pools_step_as_separate_streams(edgeseq.load(SEQ2SEQ), seed=8)
