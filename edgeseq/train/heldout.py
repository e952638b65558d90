"""The held-out (test) split of a run, saved beside its checkpoint so that later stages (the
int8 export, for one) can score a model on the same data without the original files.

Pickle-free npz: samples in physical units, concatenated, with each segment's length, its
scored targets (scaled targets, or class indices) and the mask of scored steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeseq.errors import CheckpointError
from edgeseq.spec import DataSpec

FILENAME = "heldout.npz"
LAST_STEP_TASKS = ("classify", "regress")  # many-to-one: only the final step is scored


@dataclass
class HeldoutSequence:
    x: np.ndarray  # (T, F) float32, physical units (what a graph takes)
    y: np.ndarray  # (T, O) float32 scaled targets, or (T,) int64 class indices
    mask: np.ndarray  # (T,) bool: the scored steps


def scored_mask(mask: np.ndarray, task: str) -> np.ndarray:
    """The steps that count: every valid step, or only the last one for many-to-one tasks."""
    if task not in LAST_STEP_TASKS:
        return mask
    last = np.zeros_like(mask)
    last[np.flatnonzero(mask)[-1]] = True
    return last


def save(path: Path, segments: list[HeldoutSequence]) -> None:
    np.savez(
        path,
        allow_pickle=False,
        x=np.concatenate([s.x for s in segments]),
        y=np.concatenate([s.y for s in segments]),
        mask=np.concatenate([s.mask for s in segments]),
        lengths=np.array([len(s.x) for s in segments], np.int64),
    )


def load(path: Path) -> list[HeldoutSequence]:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            x, y, mask, lengths = (arrays[k] for k in ("x", "y", "mask", "lengths"))
    except (OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable held-out split ({exc})") from None
    if lengths.sum() != len(x) or len(y) != len(x) or len(mask) != len(x):
        raise CheckpointError(f"{path}: held-out arrays disagree in length")
    bounds = np.cumsum(lengths)[:-1]
    return [
        HeldoutSequence(a, b, m)
        for a, b, m in zip(
            np.split(x, bounds), np.split(y, bounds), np.split(mask, bounds), strict=True
        )
    ]


def physical(x_scaled: np.ndarray, data: DataSpec) -> np.ndarray:
    """Undo the input scaling: the samples as the sensor delivered them."""
    std = np.asarray(data.input_scaling.std, np.float32)
    return (x_scaled * std + np.asarray(data.input_scaling.mean, np.float32)).astype(np.float32)
