"""PNG figures of a training run: loss curves, and predictions against truth on the test split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np


def _losses(ax: Any, history: list[dict[str, Any]]) -> None:
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    if any(h["val_loss"] is not None for h in history):
        ax.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (scaled units)")
    ax.set_title("Loss")
    ax.legend()


def _confusion(ax: Any, scores: dict[str, Any]) -> None:
    counts = np.asarray(scores["confusion"])
    ax.imshow(counts, cmap="Blues")
    labels = scores["labels"]
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Test confusion (accuracy {scores['accuracy']:.3f})")


def _predictions(
    ax: Any, example: dict[str, np.ndarray], task: str, target: str, transform: str | None,
    time_label: str | None,
) -> None:  # fmt: skip
    if task == "regress":
        ax.scatter(example["truth"], example["pred"], s=12)
        lo = float(min(example["truth"].min(), example["pred"].min()))
        hi = float(max(example["truth"].max(), example["pred"].max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
        ax.set_xlabel(f"true {target}")
        ax.set_ylabel(f"predicted {target}")
    else:
        ax.plot(example["t"], example["truth"], label="truth", color="black", lw=1)
        ax.plot(example["t"], example["pred"], label="prediction", lw=1)
        ax.set_xlabel(time_label or "step")
        if np.issubdtype(np.asarray(example["t"]).dtype, np.datetime64):
            ax.tick_params(axis="x", labelrotation=30)  # dates: this panel only
        ax.set_ylabel(target)
        ax.legend()
    title = "Test predictions" + (" (one step ahead)" if task == "forecast" else "")
    ax.set_title(title + (f"; target transform: {transform}" if transform else ""))


def save_run_plot(
    path: Path,
    history: list[dict[str, Any]],
    task: str,
    scores: dict[str, Any],
    example: dict[str, np.ndarray],
    target: str,
    transform: str | None = None,
    time_label: str | None = None,
) -> None:
    """Two panels: losses per epoch, then the test-split view that suits the task (a forecast's
    title names the target transform the network predicts through; its x axis is the time
    column's values, `time_label`, when there is one)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    _losses(left, history)
    if task == "classify":
        _confusion(right, scores)
    else:
        _predictions(right, example, task, target, transform, time_label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
