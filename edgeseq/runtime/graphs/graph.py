"""A straightforward NumPy evaluation of an ONNX graph, node by node, for the ops edgeseq accepts.

This is the runtime's reference path: `Model.run` for every accepted graph (reverse and
bidirectional layers included), the proof that a fast fused plan is right, and the way to stream
graphs the fast plan does not cover. Anything outside `OPS` is refused at load, naming the node.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeseq.errors import ModelFormatError, ShapeError
from edgeseq.runtime.graphs import elementwise, recurrent_ops

RECURRENT = ("RNN", "LSTM", "GRU")
# Nodes that carry state from step to step (ONNX Runtime's int8 LSTM included).
STATEFUL = (*RECURRENT, "DynamicQuantizeLSTM")
STANDARD_DOMAINS = ("", "ai.onnx")
MICROSOFT_OPS = ("DynamicQuantizeLSTM",)  # ONNX Runtime's own ops, domain com.microsoft
# Ops whose output takes the broadcast shape of all their inputs.
BROADCASTING = ("Add", "Sub", "Mul", "Div", "Equal", "Where", "DequantizeLinear", "LeakyRelu")


@dataclass(frozen=True)
class Limits:
    """What evaluating a graph may cost. A file can declare a shape of 2^60 values in 8 bytes
    (an Expand or ConstantOfShape constant, a batch of 2^40), and loading evaluates the graph on
    probes: without bounds that is a MemoryError, or minutes of recurrence, before any check
    could refuse the file."""

    values: int  # elements of any one value a node computes
    work: int  # recurrent multiply-adds (steps x batch x weights), all nodes and calls together
    steps: int  # recurrent time steps, all together: each is a loop iteration of ~50 us


# While loading. A legitimate model stays far below: bench-lstm's probes and checks come to a
# few hundred steps and 1e8 multiply-adds; one exported at a fixed 4,096 steps runs ~4 times
# (a model of up to ~250,000 weights fits).
# A hostile file is refused within about 10 s of recurrence (2^17 steps).
LOAD_LIMITS = Limits(values=1 << 24, work=1 << 32, steps=1 << 17)
STATE_PASSES = 32  # work counted per state value and step (see _cost)


@dataclass
class _Budget:
    limits: Limits
    work: int = 0  # spent so far
    steps: int = 0


_BUDGET: ContextVar[_Budget | None] = ContextVar("edgeseq_graph_budget", default=None)


@contextmanager
def limited(limits: Limits) -> Iterator[None]:
    """Every graph evaluation in this context (this thread) is held to `limits`, the recurrent
    steps and work summed over all of them. Outside it there are none: the sizes of a run are
    then the caller's own data."""
    token = _BUDGET.set(_Budget(limits))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def limits_in_force() -> bool:
    """Whether this is a load (its probes are held to limits), not a caller's run."""
    return _BUDGET.get() is not None


@dataclass(frozen=True)
class Node:
    name: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(hash=False)


def _tensor(tensor: onnx.TensorProto, where: str) -> np.ndarray:
    """An initializer or attribute tensor as an array; one whose type is unknown or whose bytes
    disagree with its dims is refused (the ONNX checker only refuses too few bytes)."""
    try:
        value = numpy_helper.to_array(tensor)
    except (KeyError, ValueError, TypeError) as exc:
        why = "an unknown data_type" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
        raise ModelFormatError(
            f"{where}: tensor {tensor.name!r} (data_type {tensor.data_type}, dims "
            f"{list(tensor.dims)}) cannot be read: {why}"
        ) from None
    if tensor.HasField("raw_data") and len(tensor.raw_data) != value.nbytes:
        raise ModelFormatError(
            f"{where}: tensor {tensor.name!r} has {len(tensor.raw_data)} bytes; its dims "
            f"{list(tensor.dims)} need {value.nbytes}"
        )
    return value


def _check_domain(node: onnx.NodeProto, index: int, where: str) -> None:
    """A node of another domain is another op, whatever its name: only ONNX's own ops, and
    ONNX Runtime's int8 LSTM in com.microsoft, are what edgeseq evaluates."""
    ok = node.domain in STANDARD_DOMAINS or (
        node.domain == "com.microsoft" and node.op_type in MICROSOFT_OPS
    )
    if not ok:
        name = node.name or f"{node.op_type}_{index}"
        raise ModelFormatError(
            f"{where}: node {name!r} is op {node.op_type!r} of domain {node.domain!r}, which "
            "edgeseq's runtime does not support"
        )


def _check_clip(node: Node, where: str) -> None:
    clip = node.attrs.get("clip")
    if node.op in STATEFUL and clip is not None and not (np.isfinite(clip) and clip > 0):
        raise ModelFormatError(f"{where}: node {node.name!r} ({node.op}) has clip {clip!r}; "
                               "expected a positive finite threshold")  # fmt: skip


def _attrs(node: onnx.NodeProto, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode("utf-8", "replace") for v in value]
        elif isinstance(value, onnx.TensorProto):
            value = _tensor(value, where)
        out[a.name] = value
    return out


def _versioned(op: str, attrs: dict[str, Any], opset: int) -> dict[str, Any]:
    """Attributes with the defaults of the model's opset made explicit, where they changed.

    Softmax before opset 13 defaults to axis 1 and normalises over the input flattened to 2-D
    at that axis (every axis from it on together), not over the one axis."""
    if op == "Softmax" and opset < 13:
        return {**attrs, "axis": attrs.get("axis", 1), "flatten_from_axis": True}
    return attrs


def _data_input_first(inputs: list[str], nodes: list[Node]) -> list[str]:
    """The graph's inputs with the data input x first, wherever the graph declares it.

    Everything downstream takes inputs[0] as x, but ONNX does not order inputs: a graph may
    list an initial state or sequence_lens first. x is the input that the first recurrent node's
    X is computed from (initial states reach it only through its state slots)."""
    first = next((n for n in nodes if n.op in STATEFUL), None)
    if first is None or not first.inputs:
        return inputs
    producer = {out: n for n in nodes for out in n.outputs}
    reached, todo, seen = set(), [first.inputs[0]], set()
    while todo:
        value = todo.pop()
        if value in seen:
            continue
        seen.add(value)
        if value in inputs:
            reached.add(value)
        elif value in producer:
            todo.extend(v for v in producer[value].inputs if v)
    data = next((name for name in inputs if name in reached), None)
    return inputs if data is None else [data, *(n for n in inputs if n != data)]


def _recurrent(node: Node, args: list[np.ndarray | None]) -> list[np.ndarray]:
    keys = (
        "hidden_size",
        "direction",
        "layout",
        "activations",
        "activation_alpha",
        "activation_beta",
        "clip",
    )
    kw = {k: node.attrs[k] for k in keys if k in node.attrs}
    x, w, r, *rest = args
    if x is None or w is None or r is None:
        raise ModelFormatError(f"node {node.name!r} ({node.op}) lacks its X, W or R input")
    if node.op == "LSTM":
        kw["input_forget"] = node.attrs.get("input_forget", 0)
        return list(recurrent_ops.lstm(x, w, r, *rest, **kw))
    if node.op == "GRU":
        kw["linear_before_reset"] = node.attrs.get("linear_before_reset", 0)
        return list(recurrent_ops.gru(x, w, r, *rest, **kw))
    return list(recurrent_ops.rnn(x, w, r, *rest, **kw))


class Graph:
    """A validated ONNX graph that can be evaluated on NumPy arrays."""

    def __init__(self, model: onnx.ModelProto, where: str) -> None:
        graph = model.graph
        self.where = where
        self.constants: dict[str, np.ndarray] = {
            t.name: _tensor(t, where) for t in graph.initializer
        }
        self.inputs = [i.name for i in graph.input if i.name not in self.constants]
        self.outputs = [o.name for o in graph.output]
        if not self.inputs or not self.outputs:
            raise ModelFormatError(
                f"{where}: the graph has {len(self.inputs)} data inputs and "
                f"{len(self.outputs)} outputs; expected at least one of each"
            )
        for i, n in enumerate(graph.node):
            _check_domain(n, i, where)
        opset = max(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0
        )
        self.nodes = [
            Node(
                n.name or f"{n.op_type}_{i}",
                n.op_type,
                tuple(n.input),
                tuple(n.output),
                _versioned(n.op_type, _attrs(n, where), opset),
            )
            for i, n in enumerate(graph.node)
        ]
        for node in self.nodes:
            _check_clip(node, where)
        self.inputs = _data_input_first(self.inputs, self.nodes)
        for node in self.nodes:
            if node.op not in RECURRENT and node.op not in elementwise.OPS:
                raise ModelFormatError(
                    f"{where}: node {node.name!r} has op type {node.op!r}, which edgeseq's "
                    f"runtime does not support (supported: {', '.join(sorted(supported_ops()))})"
                )
        for name, value in self.constants.items():
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise ModelFormatError(f"{where}: initializer {name!r} holds NaN or infinity")

    @property
    def recurrent_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.op in STATEFUL]

    def evaluate(
        self,
        feeds: dict[str, np.ndarray],
        initial: dict[str, tuple[np.ndarray, ...]] | None = None,
    ) -> dict[str, np.ndarray]:
        """Every value of the graph, computed from `feeds`.

        `initial` replaces the initial state inputs of named recurrent nodes: this is how a
        stream carries each layer's state from one call to the next.

        Arithmetic that leaves the reals (log of 0 in a probe of zeros, say) gives NaN or
        infinity without a warning: the engines judge results by their values (a stream
        refuses a non-finite answer), as ONNX Runtime computes them.
        """
        env: dict[str, np.ndarray] = dict(self.constants)
        env.update(feeds)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for node in self.nodes:
                args = [env[i] if i else None for i in node.inputs]
                if initial and node.name in initial:
                    args += [None] * (7 - len(args))
                    args[5 : 5 + len(initial[node.name])] = initial[node.name]
                results = run_node(node, args, self.where)
                for name, value in zip(node.outputs, results, strict=False):
                    if name:
                        env[name] = value
        return env


def run_node(node: Node, args: list[Any], where: str) -> list[np.ndarray]:
    """One node on its arguments; whatever its inputs make it fail with is the file's fault,
    and said so, naming the node."""
    _check_cost(node, args, where)
    try:
        if node.op in RECURRENT:
            args = args + [None] * (8 - len(args))
            results = _recurrent(node, args[: 8 if node.op == "LSTM" else 6])
        else:
            results = list(elementwise.OPS[node.op](node.attrs, *args))
    except (ValueError, IndexError, TypeError, KeyError, AttributeError, OverflowError,
            ShapeError) as exc:  # fmt: skip
        # AttributeError: an absent optional input (None) where the op needs one
        raise ModelFormatError(
            f"{where}: node {node.name!r} ({node.op}) cannot run on these inputs: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    _check_results(node, results, where)
    return results


def _check_results(node: Node, results: list[np.ndarray], where: str) -> None:
    """Every output the node names must be one the op produces (a stream reads its state from
    them); and, under limits, none so large (a Reshape to [2^40, 0] is cheap to make and
    costly to use)."""
    named = [i for i, name in enumerate(node.outputs) if name]
    if named and named[-1] >= len(results):
        raise ModelFormatError(
            f"{where}: node {node.name!r} ({node.op}) names {len(node.outputs)} outputs; the "
            f"op produces {len(results)}"
        )
    budget = _BUDGET.get()
    if budget is None:
        return
    for value in results:
        if _elements(np.shape(value)) > budget.limits.values:
            raise ModelFormatError(
                f"{where}: node {node.name!r} ({node.op}) computed a value of shape "
                f"{list(np.shape(value))}; loading allows at most {budget.limits.values} values"
            )


def _elements(shape: tuple[int, ...] | list[int]) -> int:
    """The values a shape holds, a zero size counted as 1: an empty array of shape [2^40, 0]
    holds nothing, but whatever loops over its first axis would not end."""
    return math.prod(max(int(d), 1) for d in shape)


def _broadcast(*shapes: tuple[int, ...]) -> int:
    """Elements of the broadcast shape; 0 when the shapes do not broadcast (the op then
    raises its own error)."""
    try:
        return _elements(np.broadcast_shapes(*shapes))
    except ValueError:
        return 0


def _matmul_cost(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    if a.ndim < 2 or b.ndim < 2:
        return max(a.size, b.size), a.size + b.size
    out = _broadcast(a.shape[:-2], b.shape[:-2]) * a.shape[-2] * b.shape[-1]
    return out, out * a.shape[-1]


def _gemm_cost(node: Node, a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    if a.ndim != 2 or b.ndim != 2:
        return 0, 0
    m, k = a.shape[::-1] if node.attrs.get("transA") else a.shape
    n = b.shape[0] if node.attrs.get("transB") else b.shape[1]
    return m * n, m * n * k


def _shape_values(value: Any) -> tuple[int, ...] | None:
    """A shape given as data (Expand, ConstantOfShape): None when it is not 1-D integers."""
    if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind not in "iu":
        return None
    return tuple(int(v) for v in value)


def _cost(node: Node, args: list[Any]) -> tuple[int, int, int]:
    """(elements of the largest output, multiply-adds, recurrent steps) of running `node` on
    `args`, computed from shapes alone, before anything is allocated."""
    arrays = [a for a in args if isinstance(a, np.ndarray)]
    op, first = node.op, args[0] if args else None
    if op in STATEFUL and len(arrays) >= 3 and isinstance(first, np.ndarray) and first.ndim == 3:
        w, r = args[1], args[2]
        time_axis = 1 if node.attrs.get("layout", 0) == 1 else 0
        steps, batch = first.shape[time_axis], first.shape[1 - time_axis]
        for state in args[5:7]:  # a state of another batch size broadcasts before it fails
            if isinstance(state, np.ndarray) and state.ndim == 3:
                batch = max(batch, state.shape[1 - time_axis])
        # per step and sequence: a multiply-add per weight, and ~32 passes over each direction's
        # state (gates, activations, masks, in float64): the cost of a huge batch of small cells
        state = r.shape[0] * r.shape[-1] if isinstance(r, np.ndarray) and r.ndim == 3 else 0
        work = steps * batch * (int(np.size(w)) + int(np.size(r)) + STATE_PASSES * state)
        return 0, work, steps
    if op == "Expand" and len(args) > 1 and (shape := _shape_values(args[1])) is not None:
        return _broadcast(first.shape if isinstance(first, np.ndarray) else (), shape), 0, 0
    if op == "ConstantOfShape" and (shape := _shape_values(first)) is not None:
        return (_elements(shape) if min(shape, default=0) >= 0 else 0), 0, 0
    if op in ("MatMul", "MatMulInteger") and len(arrays) >= 2:
        return (*_matmul_cost(arrays[0], arrays[1]), 0)
    if op == "Gemm" and len(arrays) >= 2:
        return (*_gemm_cost(node, arrays[0], arrays[1]), 0)
    if op == "Gather" and len(arrays) == 2 and arrays[0].ndim:
        x, axis = arrays[0], int(node.attrs.get("axis", 0))
        if -x.ndim <= axis < x.ndim and x.shape[axis]:
            return x.size // x.shape[axis] * arrays[1].size, 0, 0
    if op in BROADCASTING:
        return _broadcast(*(a.shape for a in arrays)), 0, 0
    return 0, 0, 0  # the rest compute no more values than they are given


def _check_cost(node: Node, args: list[Any], where: str) -> None:
    """Refuse, before computing it, a node that would exceed the limits in force; charge its
    recurrent steps and work to the budget."""
    budget = _BUDGET.get()
    if budget is None:
        return
    values, work, steps = _cost(node, args)
    limits = budget.limits
    shapes = [list(np.shape(a)) for a in args if a is not None]
    for what, amount, spent, limit in (
        ("time steps", steps, budget.steps, limits.steps),
        ("values in one output", values, 0, limits.values),
        ("multiply-adds", work, budget.work, limits.work),
    ):
        if spent + amount > limit:
            so_far = f" in all, and {spent} are spent" if spent else ""
            raise ModelFormatError(
                f"{where}: node {node.name!r} ({node.op}) would compute {amount} {what} on "
                f"inputs of shapes {shapes}; loading allows at most {limit}{so_far} (a declared "
                "or constant shape is absurd)"
            )
    budget.steps, budget.work = budget.steps + steps, budget.work + work


def supported_ops() -> set[str]:
    return set(RECURRENT) | set(elementwise.OPS)


OpFn = Callable[..., list[np.ndarray]]


def fold_constants(graph: Graph) -> dict[str, np.ndarray]:
    """Every value computable without graph inputs (initializers, Constant nodes, weights behind
    DequantizeLinear...), evaluated once at load."""
    known = dict(graph.constants)
    for node in graph.nodes:
        if node.op in STATEFUL or not all((not i) or i in known for i in node.inputs):
            continue
        args = [known[i] if i else None for i in node.inputs]
        for name, value in zip(node.outputs, run_node(node, args, graph.where), strict=False):
            if name:
                known[name] = value
    return known
