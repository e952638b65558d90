"""Rich console views of a training run: the live epoch bar and the final metrics tables."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


@contextmanager
def epoch_progress(console: Console, epochs: int) -> Iterator[Callable[[Any, Any], None]]:
    """A progress bar over epochs; yields the `on_epoch` callback that advances it."""
    columns = (
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[losses]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=epochs, losses="")

        def advance(log: Any, state: Any) -> None:
            val = "-" if log.val_loss is None else f"{log.val_loss:.4f}"
            losses = (
                f"train {log.train_loss:.4f}  val {val}  |grad| {log.grad_norm_max:.2f}"
                f"  lr {log.lr:.1e}"
            )
            progress.update(task, completed=log.epoch, losses=losses)
            if state.stopped_early:
                progress.update(task, total=log.epoch)

        yield advance


def metrics_table(metrics: dict[str, Any]) -> Table:
    """Model against its baselines on the test split, one row per score."""
    baselines = metrics["baselines"]
    table = Table(title=f"{metrics['task']}: test split")
    table.add_column("metric")
    table.add_column("model", justify="right")
    for name in baselines:
        table.add_column(name.replace("_", " "), justify="right")
    for key in ("accuracy", "macro_f1", "mae", "rmse"):
        if key in metrics["test"]:
            row = [f"{metrics['test'][key]:.4f}"] + [f"{b[key]:.4f}" for b in baselines.values()]
            table.add_row(key, *row)
    return table


def confusion_table(scores: dict[str, Any]) -> Table:
    table = Table(title="confusion (rows: true, columns: predicted)")
    table.add_column("")
    for label in scores["labels"]:
        table.add_column(label, justify="right")
    for label, row in zip(scores["labels"], scores["confusion"], strict=True):
        table.add_row(label, *map(str, row))
    return table
