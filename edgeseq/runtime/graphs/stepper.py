"""Streaming any accepted forward-only graph without a fused plan: evaluate it one sample at a
time, carrying each recurrent node's final state into its initial state on the next call.

Slower than the kernels (a NumPy pass over the whole graph per sample) but exact for every graph
the loader accepts: sequence_lens inputs, seq2seq decoders, quantised activations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from edgeseq.errors import ModelFormatError
from edgeseq.runtime.graphs.graph import STATEFUL, Graph


def streamable(graph: Graph) -> Graph:
    """The graph with every recurrent node's Y_h (and Y_c) output named, so each call can read
    the state it ends in; refuses graphs whose recurrence cannot run one sample at a time."""
    nodes = []
    for node in graph.nodes:
        if node.op in STATEFUL:
            direction = node.attrs.get("direction", "forward")
            if direction != "forward":
                raise ModelFormatError(
                    f"node {node.name!r} runs {direction}: its output at step t depends on samples "
                    "after t, so it cannot stream one sample at a time (use Model.run on whole "
                    "sequences)"
                )
            count = 3 if "LSTM" in node.op else 2
            outs = list(node.outputs) + [""] * (count - len(node.outputs))
            outs = [o or f"{node.name}/state{i}" for i, o in enumerate(outs)]
            node = replace(node, outputs=tuple(outs))
        nodes.append(node)
    clone = object.__new__(Graph)
    clone.__dict__.update(graph.__dict__)
    clone.nodes = nodes
    return clone


def state_keys(graph: Graph) -> list[tuple[str, str, int]]:
    """(state key, node name, output index) for every piece of recurrent state."""
    keys = []
    for node in graph.recurrent_nodes:
        keys.append((f"{node.name}.h", node.name, 1))
        if "LSTM" in node.op:
            keys.append((f"{node.name}.c", node.name, 2))
    return keys


def stream_time_nodes(graph: Graph, probe: Callable[[int], dict[str, np.ndarray]]) -> set[str]:
    """Recurrent nodes whose sequence axis is the stream's time axis (their state carries over).

    A seq2seq decoder, for one, runs its own `horizon` steps from a fresh state at every sample:
    its sequence length does not change with the input's, which is how it is told apart.
    """
    lengths: dict[str, list[int]] = {}
    for steps in (2, 3):
        env = graph.evaluate(probe(steps))
        for node in graph.recurrent_nodes:
            x = env[node.inputs[0]]
            axis = 1 if node.attrs.get("layout", 0) == 1 else 0
            lengths.setdefault(node.name, []).append(int(x.shape[axis]))
    return {name for name, seen in lengths.items() if seen == [2, 3]}


def step_graph(
    graph: Graph, feeds: dict[str, np.ndarray], state: dict[str, tuple[np.ndarray, ...]]
) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, ...]]]:
    """One call on a one-sample input; returns the values and each node's state to carry."""
    env = graph.evaluate(feeds, state)
    carried = {}
    for node in graph.recurrent_nodes:
        if node.name in state:
            carried[node.name] = tuple(env[o] for o in node.outputs[1:])
    return env, carried
