"""A forecast's target transform as graph pieces around the exported network (torch -> ONNX).

The network's own graph (Exportable: scaling, recurrent layers, head) is exported as always;
the transform's front (the samples' target columns -> what the network reads) and back (its
outputs -> physical forecasts, and the new past) are exported as two small graphs of standard
ops and joined to it by name (`compose`). The joints keep fixed names, X_MODEL and Y_MODEL, so
the runtime finds the network's data path between them and runs the transform as fused cells
(runtime/planning/plan.py); ONNX Runtime and OpenVINO run the joined graph as it is.

State: lag0/lagn of shape [1 + lag, batch, targets], batch on axis 1 like h0. Row 0 says
whether the stream has seen a sample (0: fresh, so the first sample primes the past); rows
1..lag hold the targets' last `lag` values in physical units, oldest first.
"""

from __future__ import annotations

import io
import warnings

import onnx
import torch
from torch import Tensor, nn

from edgeseq.artifact import LAG_INPUT, LAG_OUTPUT, OPSET, X_MODEL, Y_MODEL
from edgeseq.spec import TargetTransform


class _Pieces(nn.Module):
    """What the front and the back share: the history [past..., now] of the target columns."""

    def __init__(self, transform: TargetTransform, n_targets: int, horizon: int) -> None:
        super().__init__()
        self.transform, self.n, self.horizon = transform, n_targets, horizon
        self.lag = transform.lag

    def history(self, now: Tensor, lag0: Tensor) -> Tensor:
        """(B, lag + T, n) physical: the past (primed with the first sample on a fresh
        stream), then now. The mix is arithmetic, not a Where: the flag is exactly 0 or 1."""
        lag = lag0.transpose(0, 1)  # (B, 1 + lag, n)
        seen = lag[:, :1, :1]
        past = lag[:, 1:, :] * seen + now[:, :1, :] * (1.0 - seen)
        return torch.cat([past, now], dim=1)

    def change(self, new: Tensor, old: Tensor) -> Tensor:
        """log(new / old), a ratio (no cancellation of two rounded logs), or new - old."""
        return torch.log(new / old) if self.transform.log else new - old


class Front(_Pieces):
    """x (B, T, F) physical, lag0 -> what the network reads (B, T, F): the target columns
    replaced by their change since `lag` steps back (or by their log, without a lag)."""

    def forward(self, x: Tensor, lag0: Tensor | None = None) -> Tensor:
        now = x[:, :, : self.n]
        if self.lag:
            assert lag0 is not None
            seen = self.change(now, self.history(now, lag0)[:, : -self.lag])
        else:
            seen = torch.log(now) if self.transform.log else now
        if x.shape[2] == self.n:
            return seen
        return torch.cat([seen, x[:, :, self.n :]], dim=2)


class Back(_Pieces):
    """The network's outputs (B, T, horizon * n) in the transform's units, x, lag0 -> the
    forecasts in physical units, and lagn."""

    def forward(
        self, y: Tensor, x: Tensor | None = None, lag0: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        log = self.transform.log
        if not self.lag:
            return (torch.exp(y) if log else y,)
        assert x is not None and lag0 is not None
        now = x[:, :, : self.n]
        hist = self.history(now, lag0)
        if self.transform.seasonal:  # step t + k changes from the value at t + k - lag
            bases = [hist[:, k : k - self.lag] if k < self.lag else hist[:, self.lag :]
                     for k in range(1, self.horizon + 1)]  # fmt: skip
        else:  # every step changes from the last value
            bases = [now] * self.horizon
        base = torch.cat(bases, dim=2)
        seen = torch.ones_like(now[:, :1, :])
        lagn = torch.cat([seen, hist[:, -self.lag :]], dim=1).transpose(0, 1)
        return (base * torch.exp(y) if log else base + y), lagn


class Transformed(nn.Module):
    """The whole model in torch, as the joined graph computes it: the parity proof's reference.
    Inputs and outputs in the graph's order: x, h0 (, c0), lag0 -> y, hn (, cn), lagn."""

    def __init__(self, network: nn.Module, transform: TargetTransform, n_targets: int,
                 horizon: int) -> None:  # fmt: skip
        super().__init__()
        self.network = network
        self.front = Front(transform, n_targets, horizon)
        self.back = Back(transform, n_targets, horizon)
        self.lagged = bool(transform.lag)

    def forward(self, x: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        lag0 = state[-1] if self.lagged else None
        states = state[:-1] if self.lagged else state
        y, *new_state = self.network(self.front(x, lag0), *states)
        back = self.back(y, x, lag0) if self.lagged else self.back(y)
        return (back[0], *new_state, *back[1:])


def _export(module: nn.Module, args: tuple[Tensor, ...], inputs: list[str],
            outputs: list[str]) -> onnx.ModelProto:  # fmt: skip
    """One piece through the TorchScript exporter (export.py's reasons), batch and time
    dynamic on every [B, T, ...] tensor and batch on axis 1 of lag0/lagn."""
    axes: dict[str, dict[int, str]] = {}
    for name in inputs + outputs:
        axes[name] = {1: "batch"} if name in (LAG_INPUT, LAG_OUTPUT) else {0: "batch", 1: "time"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(  # a file-like target is accepted by the TorchScript exporter
            module, args, buffer,  # type: ignore[arg-type]
            dynamo=False, input_names=inputs, output_names=outputs,
            dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True,
        )  # fmt: skip
    return onnx.load_from_string(buffer.getvalue())


def _renamed(graph: onnx.GraphProto, prefix: str, keep: set[str]) -> None:
    """Prefix every value and node name of a transform piece but the joints (`keep`), in
    place, so none collides with the network's (which start with "/" or "onnx::")."""

    def name(value: str) -> str:
        return value if not value or value in keep else prefix + value

    for node in graph.node:
        node.name = prefix + node.name
        node.input[:] = [name(v) for v in node.input]
        node.output[:] = [name(v) for v in node.output]
    for init in graph.initializer:
        init.name = name(init.name)
    for info in graph.value_info:
        info.name = name(info.name)
    for value in (*graph.input, *graph.output):
        value.name = name(value.name)


def compose(network: onnx.ModelProto, transform: TargetTransform, n_features: int,
            n_targets: int, horizon: int) -> onnx.ModelProto:  # fmt: skip
    """The network's graph (x, states -> y, states) joined to the transform's front and back:
    x, states, lag0 -> y, states, lagn, the network reading X_MODEL and writing Y_MODEL."""
    lagged = bool(transform.lag)
    x = torch.rand(1, 3, n_features) + 0.5  # positive: the log transforms' domain
    lag0 = torch.zeros(1 + transform.lag, 1, n_targets)
    y = torch.zeros(1, 3, horizon * n_targets)
    front = _export(Front(transform, n_targets, horizon), (x, lag0) if lagged else (x,),
                    ["x", LAG_INPUT] if lagged else ["x"], [X_MODEL])  # fmt: skip
    back = _export(Back(transform, n_targets, horizon), (y, x, lag0) if lagged else (y,),
                   [Y_MODEL, "x", LAG_INPUT] if lagged else [Y_MODEL],
                   ["y", LAG_OUTPUT] if lagged else ["y"])  # fmt: skip
    core = onnx.ModelProto()
    core.CopyFrom(network)
    graph = core.graph
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    joints = {"x", "y", X_MODEL, Y_MODEL, LAG_INPUT, LAG_OUTPUT, *inputs, *outputs}
    _renamed(front.graph, "front/", joints)  # the network keeps its names (and its state's)
    _renamed(back.graph, "back/", joints)
    for node in graph.node:  # the network's own x and y become the joints
        node.input[:] = [X_MODEL if v == "x" else v for v in node.input]
        node.output[:] = [Y_MODEL if v == "y" else v for v in node.output]
    states_in = [i for i in graph.input if i.name != "x"]
    states_out = [o for o in graph.output if o.name != "y"]
    nodes = [*front.graph.node, *graph.node, *back.graph.node]
    joined = onnx.helper.make_graph(
        nodes,
        "edgeseq",
        [front.graph.input[0], *states_in, *front.graph.input[1:]],
        [back.graph.output[0], *states_out, *back.graph.output[1:]],
        [*front.graph.initializer, *graph.initializer, *back.graph.initializer],
    )
    model = onnx.helper.make_model(joined, opset_imports=list(network.opset_import))
    model.ir_version = network.ir_version
    return model
