"""The plan's program (runtime/kernels/program.py): one typed op per step, one layout for the
kernels."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import numpy as np
import pytest

import edgeseq
from edgeseq.runtime.kernels import cells
from edgeseq.runtime.kernels import program as ir

ROOT = Path(__file__).resolve().parents[2]
ARRAYS = {"p", "x", "y", "state", "gates", "sample"}  # what a cell takes before an op's fields


@pytest.mark.parametrize("kind", ir.KINDS, ids=lambda kind: kind.__name__)
def test_an_ops_fields_are_its_cells_arguments_in_order_so_a_row_passes_straight_through(kind):
    """interpreter.py passes row[1], row[2], ... and specialize.py writes op.values() as the cell's
    arguments after its arrays: the op's fields must be those arguments, named and ordered."""
    cell = getattr(cells, kind.CELL).py_func
    params = list(inspect.signature(cell).parameters)
    arrays = [name for name in params if name in ARRAYS]
    assert params[: len(arrays)] == arrays
    assert [f.name for f in dataclasses.fields(kind)] == params[len(arrays) :]
    assert ("state" in arrays) is kind.STATEFUL
    assert not kind.ARRAYS or len(kind.ARRAYS) == len(arrays)  # specialize.py passes these
    assert 1 + len(dataclasses.fields(kind)) <= ir.CODE_WIDTH
    assert ir.OPS[kind.OPCODE] is kind


@pytest.mark.parametrize("path", sorted((ROOT / "export").glob("*.onnx")), ids=lambda p: p.stem)
def test_every_fused_plan_decodes_back_from_its_code_rows(path):
    plan = edgeseq.load(path).plan
    if plan is None:
        pytest.skip("no fused plan for this model (yet)")
    assert [ir.decode(row) for row in plan.code] == plan.ops
    assert plan.code.dtype == np.int64 and plan.code.shape == (len(plan.ops), ir.CODE_WIDTH)
    assert plan.ops[-1].width == plan.n_outputs
