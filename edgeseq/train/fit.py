"""The training loop: backpropagation through time, truncated BPTT, clipping, early stopping.

Truncated BPTT (`tbptt=K`): each window is walked in chunks of K steps; the state is carried from
chunk to chunk but detached, so the autograd graph (and memory) spans at most K steps while the
model still sees state built up over the whole sequence.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from edgeseq.data.windows import Windows
from edgeseq.train.networks import State, detach_state


@dataclass
class FitOptions:
    epochs: int = 100
    batch_size: int = 32
    lr: float = 3e-3
    tbptt: int | None = None
    clip: float = 1.0  # max gradient norm; 0 disables clipping by norm
    clip_value: float | None = None
    patience: int = 20  # epochs without validation improvement before stopping
    classify: bool = False


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    val_loss: float | None
    grad_norm_mean: float  # gradient norm before clipping, mean over the epoch's updates
    grad_norm_max: float
    clipped_fraction: float  # share of updates whose norm exceeded --clip
    lr: float


@dataclass
class FitState:
    """Everything a resumed run needs to continue exactly where it stopped."""

    epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[EpochLog] = field(default_factory=list)
    best_weights: dict[str, Tensor] | None = None
    stopped_early: bool = False


def masked_loss(y: Tensor, target: Tensor, mask: Tensor, classify: bool) -> Tensor:
    """Mean loss over the scored steps only (cross-entropy or mean squared error)."""
    if classify:
        return nn.functional.cross_entropy(y[mask], target[mask])
    return nn.functional.mse_loss(y[mask], target[mask])


def _chunks(steps: int, tbptt: int | None) -> list[slice]:
    size = tbptt or steps
    return [slice(s, s + size) for s in range(0, steps, size)]


def _update(model: nn.Module, opt: torch.optim.Optimizer, loss: Tensor, o: FitOptions) -> float:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if o.clip_value is not None:
        nn.utils.clip_grad_value_(model.parameters(), o.clip_value)
    norm = nn.utils.clip_grad_norm_(model.parameters(), o.clip if o.clip > 0 else math.inf)
    opt.step()
    return float(norm)


def _train_epoch(
    model: nn.Module, opt: torch.optim.Optimizer, data: Windows, o: FitOptions, gen: torch.Generator
) -> tuple[float, list[float]]:
    model.train()
    order = torch.randperm(len(data), generator=gen)
    total, count, norms = 0.0, 0, []
    for start in range(0, len(data), o.batch_size):
        idx = order[start : start + o.batch_size]
        x, y, mask = data.x[idx], data.y[idx], data.mask[idx]
        state: State | None = None
        for part in _chunks(x.shape[1], o.tbptt):
            out, state = model(x[:, part], state)
            state = detach_state(state)
            scored = mask[:, part]
            n = int(scored.sum())
            if n == 0:
                continue
            loss = masked_loss(out, y[:, part], scored, o.classify)
            norms.append(_update(model, opt, loss, o))
            total += float(loss.detach()) * n
            count += n
    return total / max(count, 1), norms


def fit(
    model: nn.Module,
    data: Windows,
    validate: Callable[[nn.Module], float] | None,
    options: FitOptions,
    *,
    seed: int = 0,
    state: FitState | None = None,
    resume: dict[str, Any] | None = None,
    on_epoch: Callable[[EpochLog, FitState, dict[str, Any]], None] | None = None,
) -> FitState:
    """Train `model` in place; at the end it holds the weights of the best epoch.

    `validate(model)` returns the validation loss (early stopping and the learning-rate schedule
    follow it); without it, the training loss is used. `on_epoch` gets each epoch's log, the
    loop state and what a checkpoint needs to resume (optimizer, schedule, shuffling generator).
    """
    state = state or FitState()
    opt = torch.optim.Adam(model.parameters(), lr=options.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, factor=0.5, patience=max(2, options.patience // 3)
    )
    gen = torch.Generator().manual_seed(seed)
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        gen.set_state(resume["generator"])
    while state.epoch < options.epochs and not state.stopped_early:
        train_loss, norms = _train_epoch(model, opt, data, options, gen)
        val_loss = validate(model) if validate else None
        watched = val_loss if val_loss is not None else train_loss
        sched.step(watched)
        state.epoch += 1
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"training loss became {train_loss} at epoch {state.epoch}; lower --lr or --clip"
            )
        if watched < state.best_loss - 1e-7:
            state.best_loss, state.best_epoch, state.bad_epochs = watched, state.epoch, 0
            state.best_weights = copy.deepcopy(model.state_dict())
        else:
            state.bad_epochs += 1
            state.stopped_early = state.bad_epochs >= options.patience
        clip = options.clip if options.clip > 0 else math.inf
        state.history.append(
            EpochLog(
                epoch=state.epoch,
                train_loss=train_loss,
                val_loss=val_loss,
                grad_norm_mean=sum(norms) / max(len(norms), 1),
                grad_norm_max=max(norms, default=0.0),
                clipped_fraction=sum(n > clip for n in norms) / max(len(norms), 1),
                lr=float(opt.param_groups[0]["lr"]),
            )
        )
        if on_epoch is not None:
            resumable = {
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "generator": gen.get_state(),
            }
            on_epoch(state.history[-1], state, resumable)
    if state.best_weights is not None:
        model.load_state_dict(state.best_weights)
    return state


def history_as_dicts(state: FitState) -> list[dict[str, Any]]:
    return [asdict(e) for e in state.history]
