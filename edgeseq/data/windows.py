"""Cut encoded sequences into fixed-length training windows (padded, with a loss mask).

A window shorter than its sequence starts from a zero state; with `--tbptt` and no `--window`
the window is the whole sequence and the trainer carries state across its chunks instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from edgeseq.data.prepare import Encoded
from edgeseq.errors import UsageError

MAX_WINDOWS = 4096  # automatic stride keeps an epoch at about this many windows


@dataclass
class Windows:
    """x (N, W, F) float32, y (N, W, O) float32 or (N, W) int64, mask (N, W) bool."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _starts(steps: int, window: int, stride: int) -> list[int]:
    if steps <= window:
        return [0]
    starts = list(range(0, steps - window + 1, stride))
    if starts[-1] != steps - window:
        starts.append(steps - window)  # always cover the newest rows
    return starts


def auto_stride(encoded: list[Encoded], window: int) -> int:
    """Stride 1 unless that yields more than MAX_WINDOWS windows per epoch."""
    total = sum(max(1, len(e.x) - window + 1) for e in encoded)
    return max(1, math.ceil(total / MAX_WINDOWS))


def make_windows(
    encoded: list[Encoded], window: int | None, stride: int | None, *, last_only: bool
) -> Windows:
    """Windows of `window` steps (None: whole sequences) every `stride` steps.

    With `last_only` (many-to-one tasks) only the last valid step of each window is scored.
    """
    longest = max(len(e.x) for e in encoded)
    if window is not None and window > longest:
        raise UsageError(
            f"--window {window} is longer than the longest training sequence ({longest} steps)"
        )
    if window is not None and window < 1:
        raise UsageError(f"--window must be >= 1, found {window}")
    if stride is not None and stride < 1:
        raise UsageError(f"--stride must be >= 1, found {stride}")
    width = longest if window is None else window
    step = stride or auto_stride(encoded, width)
    xs, ys, ms = [], [], []
    for e in encoded:
        for start in _starts(len(e.x), width, step):
            stop = min(start + width, len(e.x))
            mask = np.zeros(width, bool)
            mask[: stop - start] = e.mask[start:stop]
            if last_only and mask.any():
                last = int(np.flatnonzero(mask)[-1])
                mask[:] = False
                mask[last] = True
            if not mask.any():
                continue
            x = np.zeros((width, e.x.shape[1]), np.float32)
            x[: stop - start] = e.x[start:stop]
            y = np.zeros((width, *e.y.shape[1:]), e.y.dtype)
            y[: stop - start] = e.y[start:stop]
            xs.append(x)
            ys.append(y)
            ms.append(mask)
    if not xs:
        raise UsageError("no training window has a target to learn; the data is too short")
    return Windows(
        torch.from_numpy(np.stack(xs)),
        torch.from_numpy(np.stack(ys)),
        torch.from_numpy(np.stack(ms)),
    )
