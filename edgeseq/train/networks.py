"""PyTorch modules for every task shape: a recurrent stack (RNN, LSTM or GRU) and linear heads.

All models map x (B, T, input_size) and an optional state to y (B, T, output_size) and the new
state, causally: the output at step t depends only on samples up to t. That is what lets one
ONNX graph serve both whole sequences and one-sample-at-a-time streaming.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edgeseq.spec import ModelSpec

State = Tensor | tuple[Tensor, Tensor]


def recurrent_stack(spec: ModelSpec, input_size: int) -> nn.RNNBase:
    """The torch recurrent layer stack for `spec` (batch-first, as everything here)."""
    dropout = spec.dropout if spec.num_layers > 1 else 0.0
    common = dict(
        input_size=input_size,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        batch_first=True,
        dropout=dropout,
    )
    if spec.cell == "lstm":
        return nn.LSTM(**common)
    if spec.cell == "gru":
        return nn.GRU(**common)
    return nn.RNN(nonlinearity=spec.nonlinearity, **common)


class SequenceModel(nn.Module):
    """Recurrent stack + a linear head at every step.

    Serves forecast (synchronized many-to-many), classify and regress (many-to-one: the head's
    output at the last step is the answer; streamed, every step gives the answer so far) and
    generate (one-to-many: the fixed input vector is fed at every step).
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.rnn = recurrent_stack(spec, spec.input_size)
        self.head = nn.Linear(spec.hidden_size, spec.output_size)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        out, state = self.rnn(x, state)
        return self.head(out), state


class Seq2SeqModel(nn.Module):
    """Delayed many-to-many: an encoder reads the inputs; a decoder emits the next `horizon` steps.

    At every step t the encoder's top-layer output h(t) is the context. The decoder, from a zero
    state, reads that context repeated `horizon` times and its head emits one step of the targets
    per decoder step. The encoder's state is what a stream keeps; the decoder is re-run from
    scratch for each forecast, so it never disturbs the stream.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.rnn = recurrent_stack(spec, spec.input_size)
        self.decoder = recurrent_stack(spec, spec.hidden_size)
        self.head = nn.Linear(spec.hidden_size, spec.n_targets)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        context, state = self.rnn(x, state)  # (B, T, H)
        batch, steps, hidden = context.shape
        repeated = context.reshape(batch * steps, 1, hidden).expand(-1, self.spec.horizon, -1)
        decoded, _ = self.decoder(repeated)  # (B*T, horizon, H)
        y = self.head(decoded).reshape(batch, steps, self.spec.horizon * self.spec.n_targets)
        return y, state


def build_model(spec: ModelSpec) -> nn.Module:
    """The module for `spec.task`; weights are freshly initialised (seed torch first)."""
    return Seq2SeqModel(spec) if spec.task == "seq2seq" else SequenceModel(spec)


def detach_state(state: State) -> State:
    """Cut the autograd history of a carried state (truncated BPTT)."""
    if isinstance(state, tuple):
        return (state[0].detach(), state[1].detach())
    return state.detach()


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, chunk: int = 4096) -> Tensor:
    """Run a (B, T, F) batch through in chunks of time with the state carried (bounded memory)."""
    model.eval()
    outputs, state = [], None
    for start in range(0, x.shape[1], chunk):
        y, state = model(x[:, start : start + chunk], state)
        outputs.append(y)
    return torch.cat(outputs, dim=1)
