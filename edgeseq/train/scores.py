"""Scores for predictions against truth: MAE/RMSE for values, accuracy/macro-F1 for classes."""

from __future__ import annotations

import numpy as np


def regression_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Mean absolute and root mean squared error, in the targets' physical units."""
    err = np.asarray(pred, np.float64) - np.asarray(truth, np.float64)
    return {
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "n": int(err.size),
    }


def confusion(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """counts[i, j] = how many samples of true class i were predicted as class j."""
    counts = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(counts, (np.asarray(truth), np.asarray(pred)), 1)
    return counts


def classification_scores(pred: np.ndarray, truth: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, macro-averaged F1 and the confusion matrix (rows: truth, columns: prediction)."""
    counts = confusion(pred, truth, len(labels))
    tp = np.diag(counts).astype(np.float64)
    predicted, actual = counts.sum(axis=0), counts.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = actual > 0  # classes absent from the truth do not dilute the macro average
    return {
        "accuracy": float(tp.sum() / max(counts.sum(), 1)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "n": int(counts.sum()),
        "labels": labels,
        "confusion": counts.tolist(),
    }
