"""What a graph's inputs are: x's layout (which axis is time), declared dtypes and fixed sizes,
and feeds built to match, for probing, verification and streaming."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from edgeseq.errors import EdgeseqError, ModelFormatError
from edgeseq.runtime.graphs import recurrent_ops
from edgeseq.runtime.graphs.graph import Graph, limits_in_force

MAX_FEATURES = 1 << 20
MAX_FIXED_VALUES = 1 << 24  # x's fixed sizes, multiplied: probing evaluates the graph on one x
# Any other input's size as a probe feeds it (fixed sizes, and PROBE_BATCH for each symbolic one):
# loading allocates it, so a declared [1, batch, 2^40] must be refused before, not attempted.
MAX_DECLARED_VALUES = 1 << 22
PROBE_BATCH = 4  # the largest batch a load-time probe feeds (_probe_sizes: 2, 3 or 4)
MAX_STEPS_PROBED = 4096  # the longest fixed length find_baked_steps tries
MAX_LENGTHS_TRIED = 8  # and how many (each is a whole evaluation of the graph)


def batch_time_axes(graph_input_dims: list[int | str]) -> tuple[int, int]:
    """(batch axis, time axis) of a rank-3 input, read from its dimension names."""
    names = [str(d).lower() for d in graph_input_dims]
    if any(w in names[0] for w in ("time", "seq", "step", "len")) or "batch" in names[1]:
        return 1, 0
    return 0, 1


@dataclass
class Inputs:
    x: str
    dims: dict[str, list[int | str]]  # ints are fixed sizes
    dtypes: dict[str, np.dtype]
    n_features: int
    time_first: bool = False
    baked_steps: bool = False  # fixed_steps comes from the graph's insides, not x's declaration
    where: str = ""  # the model's path, for errors

    @property
    def fixed_steps(self) -> int | None:
        """The sequence length a graph was exported with, when it cannot take another."""
        dim = self.dims[self.x][0 if self.time_first else 1]
        return dim if isinstance(dim, int) else None

    @property
    def fixed_batch(self) -> int | None:
        """The batch size x declares, when fixed: a probe of another batch size would not fit
        the other inputs declared with it (sequence_lens [2] beside x [1, 2, F])."""
        dim = self.dims[self.x][1 if self.time_first else 0]
        return dim if isinstance(dim, int) else None

    def zeros(self, steps: int) -> np.ndarray:
        """A probe x of `steps` zero samples in the graph's layout, at the declared batch size
        where x fixes one, else 1."""
        batch = self.fixed_batch or 1
        return self.layout(np.zeros((batch, steps, self.n_features), np.float32))

    def feeds(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """x (already in the graph's layout) plus every other input: zeros of its declared dtype
        and shape, lengths (integer inputs such as sequence_lens) set to the full sequence."""
        batch, steps = (x.shape[1], x.shape[0]) if self.time_first else x.shape[:2]
        out = {self.x: x}
        for name, dims in self.dims.items():
            if name == self.x:
                continue
            shape = [d if isinstance(d, int) else batch for d in dims]
            if limits_in_force():  # x's own fixed batch, say, may be far above PROBE_BATCH
                _check_declared(name, dims, batch, self.where)
            dtype = self.dtypes[name]
            out[name] = np.full(shape, steps if dtype.kind in "iu" else 0, dtype)
        return out

    def layout(self, x_btf: np.ndarray) -> np.ndarray:
        """(batch, time, F) -> the graph's own layout."""
        return np.ascontiguousarray(np.moveaxis(x_btf, 0, 1) if self.time_first else x_btf)


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value.type.tensor_type.shape.dim]  # fmt: skip


def _dtype(info: onnx.ValueInfoProto, where: str) -> np.dtype:
    elem_type = info.type.tensor_type.elem_type
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        raise ModelFormatError(
            f"{where}: input {info.name!r} has element type {elem_type}, which is not an ONNX "
            "tensor type edgeseq knows"
        ) from None


def read_inputs(proto: onnx.ModelProto, graph: Graph, where: str) -> Inputs:
    """Validate x's declared shape and work out which of its axes is time."""
    infos = {i.name: i for i in proto.graph.input if i.name in graph.inputs}
    x = graph.inputs[0]
    if x not in infos:
        raise ModelFormatError(f"{where}: the data input {x!r} is not declared as a graph input")
    dims = {n: _dims(i) for n, i in infos.items()}
    dtypes = {n: _dtype(i, where) for n, i in infos.items()}
    if dtypes[x] != np.float32:
        declared = onnx.TensorProto.DataType.Name(infos[x].type.tensor_type.elem_type)
        raise ModelFormatError(f"{where}: input {x!r} is declared {declared}; edgeseq feeds "
                               "float32 samples (ONNX element type FLOAT)")  # fmt: skip
    x_dims = dims[x]
    if len(x_dims) != 3 or not isinstance(x_dims[2], int):
        raise ModelFormatError(
            f"{where}: input {x!r} has dims {x_dims}; expected [batch, time, "
            "features] (or [time, batch, features]) with a fixed feature count"
        )
    if not 1 <= x_dims[2] <= MAX_FEATURES:
        raise ModelFormatError(f"{where}: input {x!r} declares {x_dims[2]} features; at most "
                               f"{MAX_FEATURES} are supported")  # fmt: skip
    fixed = [d for d in x_dims[:2] if isinstance(d, int)]
    if any(d < 1 for d in fixed) or x_dims[2] * math.prod(fixed) > MAX_FIXED_VALUES:
        raise ModelFormatError(f"{where}: input {x!r} declares dims {x_dims}; a fixed batch or "
                               f"time axis must be at least 1 and x at most {MAX_FIXED_VALUES} "
                               "values")  # fmt: skip
    _state_dims(dims, graph)
    for name in dims:
        if name != x:
            _check_declared(name, dims[name], PROBE_BATCH, where)
    inputs = Inputs(x, dims, dtypes, int(x_dims[2]), where=where)
    inputs.time_first = _time_first(inputs, graph)
    return inputs


def _check_declared(name: str, dims: list[int | str], batch: int, where: str) -> None:
    """An input other than x is fed zeros of its declared shape by every probe, each symbolic
    size being the probe's batch: refuse a negative size, or one no probe could allocate."""
    fixed = [d for d in dims if isinstance(d, int)]
    probed = math.prod(max(d, 1) for d in fixed) * batch ** (len(dims) - len(fixed))
    if any(d < 0 for d in fixed) or probed > MAX_DECLARED_VALUES:
        raise ModelFormatError(
            f"{where}: input {name!r} declares dims {dims}; expected sizes of at least 0 and at "
            f"most {MAX_DECLARED_VALUES} values in all (each symbolic size counted as the "
            f"batch, {batch})"
        )


def _state_dims(dims: dict[str, list[int | str]], graph: Graph) -> None:
    """Initial-state inputs declared with symbolic dims get their sizes from the node they
    feed: [directions, batch, hidden] (layout 1: [batch, directions, hidden]). Only the batch
    axis stays symbolic, so probes feed the shapes the node will accept."""
    for node in graph.recurrent_nodes:
        hidden = node.attrs.get("hidden_size")
        r = graph.constants.get(node.inputs[2]) if len(node.inputs) > 2 else None
        if hidden is None and r is not None and r.ndim == 3:
            hidden = int(r.shape[-1])
        if hidden is None:
            continue
        directions = recurrent_ops.DIRECTIONS.get(node.attrs.get("direction", "forward"), 1)
        sizes = (
            [directions, None, hidden]
            if node.attrs.get("layout", 0) == 0
            else [None, directions, hidden]
        )
        for name in node.inputs[5:7]:
            if name in dims and len(dims[name]) == 3:
                dims[name] = [
                    size if (size is not None and not isinstance(d, int)) else d
                    for d, size in zip(dims[name], sizes, strict=True)
                ]


def _probe_sizes(d0: int | str | None, d1: int | str | None) -> tuple[int, int] | None:
    """Sizes for x's first two axes that tell them apart: the declared ones where fixed, small
    distinct ones where free; None when they cannot differ (or are too big to try)."""
    fixed = [d for d in (d0, d1) if isinstance(d, int)]
    if any(d > MAX_STEPS_PROBED for d in fixed):
        return None
    free = iter(v for v in (2, 3, 4) if v not in fixed)
    sizes = tuple(d if isinstance(d, int) else next(free) for d in (d0, d1))
    return (sizes[0], sizes[1]) if sizes[0] != sizes[1] else None


def _time_first(inputs: Inputs, graph: Graph) -> bool:
    """Ask the graph: feed an x whose first two axes differ in size, read both ways, and see
    which way its first recurrent layer runs along the right axis (fixed sizes are kept, so a
    spec-written [5, 2, F] is read as 5 steps of batch 2 by a layout-0 node). Names decide only
    when the sizes cannot differ or both readings fail."""
    named_batch_axis, _ = batch_time_axes(inputs.dims[inputs.x])
    sizes = _probe_sizes(*inputs.dims[inputs.x][:2])
    if sizes is None or not graph.recurrent_nodes:
        return named_batch_axis == 1
    node = graph.recurrent_nodes[0]
    x = np.zeros((*sizes, inputs.n_features), np.float32)
    for time_first, expected_steps in ((False, sizes[1]), (True, sizes[0])):
        inputs.time_first = time_first
        try:
            env = graph.evaluate(inputs.feeds(x))
        except EdgeseqError:  # the graph's shapes reject this reading of x
            continue
        steps = env[node.inputs[0]].shape[1 if node.attrs.get("layout", 0) == 1 else 0]
        if steps == expected_steps:
            return time_first
    return named_batch_axis == 1


def find_baked_steps(proto: onnx.ModelProto, graph: Graph, inputs: Inputs) -> bool:
    """A graph whose x declares a dynamic time axis but which runs at one length only (a
    Reshape to a constant that holds the example's length, as torch.onnx.export(dynamo=True)
    can write): find that length among the sizes its outputs and values declare, and fix x's
    time axis to it. False, and x unchanged, when no declared size makes the graph run."""
    axis = 0 if inputs.time_first else 1
    declared = {
        d for v in (*proto.graph.output, *proto.graph.value_info) for d in _dims(v)
        if isinstance(d, int) and 1 < d <= MAX_STEPS_PROBED
    }  # fmt: skip
    original = list(inputs.dims[inputs.x])
    for steps in sorted(declared)[:MAX_LENGTHS_TRIED]:
        inputs.dims[inputs.x] = [*original[:axis], steps, *original[axis + 1 :]]
        try:
            graph.evaluate(inputs.feeds(inputs.zeros(steps)))
        except EdgeseqError:
            continue
        inputs.baked_steps = True
        return True
    inputs.dims[inputs.x] = original
    return False
