"""Training: a Dataset and a TrainConfig in, a run directory that describes itself out.

- pipeline: `train()`, the whole job: prepare, choose a target transform, fit, evaluate, save;
- networks: the PyTorch modules of every task shape (a recurrent stack and linear heads);
- fit: the loop itself: BPTT, truncated BPTT, clipping, early stopping, resumable state;
- run_checkpoint: `checkpoint.pt`, self-describing and loaded without unpickling objects;
- heldout: the test split saved beside it, for the stages after training (export, int8);
- evaluate, scores, classical: held-out scores beside naive and classical baselines;
- report, plots: what a person sees: the live progress line, tables, PNG figures.

`from edgeseq.train import TrainConfig, train` is the public entry; the names load lazily, so
that importing one of the modules above does not import the whole pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeseq.train.pipeline import RunResult, TrainConfig, train

__all__ = ["RunResult", "TrainConfig", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from edgeseq.train import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
