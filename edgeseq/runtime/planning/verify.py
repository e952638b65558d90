"""Proof that a fused plan computes what its graph computes, and the layout helpers it needs.

The loader runs the plan (one stream at a time, as deployed) and the graph (whole sequences, the
straightforward evaluation) on the same random inputs and refuses the plan when they differ.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np

from edgeseq import config
from edgeseq.runtime.graphs.graph import Graph, Node
from edgeseq.runtime.kernels import interpreter as k
from edgeseq.runtime.kernels import program as ir
from edgeseq.runtime.planning.plan import NoPlan, Plan


def to_btf(y: np.ndarray, batch: int, steps: int, time_first: bool) -> np.ndarray:
    """A graph output as (batch, time, features), whatever axes its producer used."""
    if time_first:
        axis = next((i for i in range(1, y.ndim) if y.shape[i] == batch), None)
        if axis is None:
            raise NoPlan(f"the output {y.shape} has no batch axis of size {batch}")
        y = np.moveaxis(y, axis, 0)
    return y.reshape(batch, steps, -1)


def last_step(y: np.ndarray, batch: int) -> np.ndarray:
    """A many-to-one output (batch axis after leading 1s, no time axis) as (batch, 1, features)."""
    axis = next((i for i in range(y.ndim) if y.shape[i] == batch and y.size and
                 all(d == 1 for d in y.shape[:i])), None)  # fmt: skip
    if axis is None:
        raise NoPlan(f"the output {y.shape} has no batch axis of size {batch}")
    return np.moveaxis(y, axis, 0).reshape(batch, 1, -1)


def _expected(y: np.ndarray, plan: Plan, batch: int, steps: int, time_first: bool) -> np.ndarray:
    """The graph's output as (batch, steps or 1, n_outputs): every step's, or only the last's."""
    if y.size == batch * steps * plan.n_outputs:
        return to_btf(y, batch, steps, time_first)
    if y.size == batch * plan.n_outputs:
        return last_step(y, batch)
    raise NoPlan(f"the output {y.shape} holds neither every step's {plan.n_outputs} values "
                 f"nor the last step's, for {batch} sequences of {steps} steps")  # fmt: skip


def own_kernel_only(plan: Plan) -> bool:
    """Whether the plan has ops only the per-model kernels run (program.OWN_KERNEL_ONLY: the
    *_ANY cells, the int8 ops, a seq2seq decoder): the interpreter does not hold them."""
    return plan.uses(*ir.OWN_KERNEL_ONLY)


def weight_only(graph: Graph) -> Graph:
    """The graph as the int8 plan computes it: where it quantizes the data path for an int8
    MatMul (DynamicQuantizeLinear), the values pass through unquantized (an Identity, scale 1,
    zero point 0), so the plan, whose int8 ops quantize weights only, is checked against the
    same map (elementwise's MatMulInteger then multiplies floats by the dequantized weights)."""
    quantizers = [node for node in graph.nodes if node.op == "DynamicQuantizeLinear"]
    if not quantizers:
        return graph
    twin = copy.copy(graph)
    twin.constants = dict(graph.constants)
    for node in quantizers:
        _, scale, zero = [*node.outputs, "", ""][:3]
        twin.constants |= {scale: np.array(1.0, np.float32), zero: np.array(0.0, np.float32)}
    twin.nodes = [
        Node(node.name, "Identity", node.inputs[:1], node.outputs[:1], {})
        if node.op == "DynamicQuantizeLinear"
        else node
        for node in graph.nodes
    ]
    return twin


def _own_feed(plan: Plan) -> Callable[[np.ndarray, np.ndarray], None]:
    """feed(xs, ys) through the model's own kernel (specialize.py), from the initial state."""
    from edgeseq.runtime.planning.specialize import compile_kernel, work_size

    kernel = compile_kernel(plan)

    def feed(xs: np.ndarray, ys: np.ndarray) -> None:
        work = np.zeros(work_size(plan), np.float32)
        work[: plan.state_size] = plan.initial_state
        kernel(plan.params, xs.reshape(-1), work, ys.reshape(-1))

    return feed


def verify(plan: Plan, graph: Graph, feeds: list[dict[str, np.ndarray]], time_first: bool) -> float:
    """Largest relative gap between the plan streaming each batch row and the graph evaluated
    on whole sequences, over the given feeds (the loader uses two lengths x two batch sizes).
    A graph whose output is the last step only (many-to-one) is compared at the last step.

    The plan runs in the kernel its streams will run: the model's own (specialize.py) unless
    EDGESEQ_SPECIALIZE=0. That checks the code that is deployed, and on a cold cache the first
    prediction compiles one kernel instead of two: the interpreter inlines every cell kind,
    and compiling it took three times as long as the model's own kernel."""
    own = _own_feed(plan) if config.ENV.specialize or own_kernel_only(plan) else None
    reference = weight_only(graph)
    worst = 0.0
    for feed in feeds:
        x = feed[graph.inputs[0]]
        xs = np.moveaxis(x, 1, 0) if time_first else x  # (B, T, F)
        y = reference.evaluate(feed)[plan.output]
        expected = _expected(y, plan, xs.shape[0], xs.shape[1], time_first)
        scratch = np.zeros((3, plan.width), np.float32)
        for b in range(xs.shape[0]):
            state = plan.initial_state.copy()
            ys = np.zeros((xs.shape[1], plan.n_outputs), np.float32)
            if own is not None:
                own(np.ascontiguousarray(xs[b]), ys)
            else:
                k.feed(plan.code, plan.params, np.ascontiguousarray(xs[b]), state, scratch, ys)
            ys = ys[-expected.shape[1] :]
            gap = np.abs(ys - expected[b]) / (1.0 + np.abs(expected[b]))
            worst = max(worst, float(np.nan_to_num(gap, nan=np.inf).max()))  # NaN: no match
    return worst
