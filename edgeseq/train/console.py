"""Rich console views of a training run: the live epoch bar and the final metrics tables."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class _EpochProgress:
    """The `on_epoch` callback that advances a progress bar, and `phase` to name a new fit (the
    bar starts over)."""

    def __init__(self, progress: Progress, epochs: int) -> None:
        self.progress, self.epochs = progress, epochs
        self.task = progress.add_task("training", total=epochs, losses="")

    def __call__(self, log: Any, state: Any) -> None:
        val = "-" if log.val_loss is None else f"{log.val_loss:.3f}"
        losses = f"train {log.train_loss:.3f} val {val} |g| {log.grad_norm_max:.2f} lr {log.lr:.0e}"
        self.progress.update(self.task, completed=log.epoch, losses=losses)
        if state.stopped_early:
            self.progress.update(self.task, total=log.epoch)

    def phase(self, name: str) -> None:
        if self.progress.tasks[0].completed:
            self.task = self.progress.add_task(name, total=self.epochs, losses="")
        else:
            self.progress.update(self.task, description=name)


@contextmanager
def epoch_progress(console: Console, epochs: int) -> Iterator[_EpochProgress]:
    """A progress bar over epochs; yields the `on_epoch` callback that advances it."""
    columns = (  # one line of at most 80 columns: a terminal's default width
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=10),
        MofNCompleteColumn(),
        TextColumn("{task.fields[losses]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        yield _EpochProgress(progress, epochs)


def _transform(meta: dict[str, Any]) -> str:
    """What the network predicts for the targets (spec.TargetTransform), as `train` names it."""
    transform = (meta.get("data_spec") or {}).get("target_transform")
    if not transform:
        return "none (the targets' levels)"
    season = f", season {transform['season']}" if transform["name"].endswith("seasonal") else ""
    return f"{transform['name']}{season} (inverse in the graph: outputs in physical units)"


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
            row = [f"{metrics['test'][key]:.4f}"]
            row += [f"{b[key]:.4f}" if key in b else "-" for b in baselines.values()]
            table.add_row(key, *row)
    notes = [f"{name.replace('_', ' ')}: {b['note']}" for name, b in baselines.items()
             if "note" in b]  # fmt: skip
    transform, tried = (
        metrics.get("target_transform"),
        metrics.get("target_transform_validation_rmse", {}),
    )
    if transform is not None:
        how = f"best validation RMSE of {', '.join(tried)}" if len(tried) > 1 else "as asked"
        notes.insert(0, f"target transform: {transform} ({how})")
    table.caption = "; ".join(notes) or None
    return table


def confusion_table(scores: dict[str, Any]) -> Table:
    table = Table(title="confusion (rows: true, columns: predicted)")
    table.add_column("")
    for label in scores["labels"]:
        table.add_column(label, justify="right")
    for label, row in zip(scores["labels"], scores["confusion"], strict=True):
        table.add_row(label, *map(str, row))
    return table


def _period(meta: dict[str, Any]) -> str:
    if meta.get("sample_rate_hz"):
        return f"{1 / meta['sample_rate_hz']:.4g} s ({meta['sample_rate_hz']:.4g} Hz)"
    if meta.get("sample_period"):
        return f"{meta['sample_period']:.4g} {meta['sample_period_unit']}"
    return "-"


def inspect_tables(info: dict[str, Any]) -> list[Table]:
    """`edgeseq inspect` as tables: summary, tensors, node types."""
    meta = info.get("metadata") or {}
    summary = Table(title=info["path"], show_header=False)
    summary.add_column("key", style="bold")
    summary.add_column("value")
    rows = [
        ("file size", f"{info['file_bytes']:,} bytes"),
        ("parameters", f"{info['parameters']:,} ({', '.join(info['initializer_dtypes'])})"),
        ("opset", str(info["opset"])),
        ("producer", info["producer"] or "-"),
    ]
    if meta:
        spec = meta["model_spec"]
        rows += [
            ("task", meta["task"]),
            ("model", f"{spec['cell']} {spec['num_layers']} x {spec['hidden_size']}"),
            ("features", ", ".join(meta["feature_names"])),
            ("targets", ", ".join(meta["target_names"]) or "-"),
            ("class labels", ", ".join(meta["class_labels"]) or "-"),
            ("sample period", _period(meta)),
            ("target transform", _transform(meta)),
            ("state", ", ".join(f"{p['input']} -> {p['output']}" for p in meta["state"])),
            ("output", meta["output_layout"]),
        ]
        parity = meta.get("parity") or {}
        for key in (
            "torch_vs_onnxruntime_full_sequence",
            "onnxruntime_streamed_vs_torch_full_sequence",
        ):
            if key in parity:
                rows.append((key.replace("_", " "), f"{parity[key]:.2e}"))
    else:
        rows.append(("edgeseq metadata", "none (not an edgeseq export)"))
    for key, value in rows:
        summary.add_row(key, escape(value))
    tensors = Table(title="inputs and outputs")
    for name in ("", "name", "shape"):
        tensors.add_column(name)
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            shape = "[" + ", ".join(map(str, t["shape"])) + "]"
            tensors.add_row(kind[:-1], escape(t["name"]), escape(shape))
    nodes = Table(title="nodes")
    nodes.add_column("op type")
    nodes.add_column("count", justify="right")
    for op, count in sorted(info["nodes"].items()):
        nodes.add_row(op, str(count))
    return [summary, tensors, nodes]


def parity_line(parity: dict[str, Any]) -> str:
    """The export's proof in one line."""
    return (
        f"max abs error vs PyTorch {parity['torch_vs_onnxruntime_full_sequence']:.2e} full "
        f"sequence, {parity['onnxruntime_streamed_vs_torch_full_sequence']:.2e} over "
        f"{parity['streamed_steps']} streamed steps (limit {parity['tolerance']:g})"
    )


def predictions_table(example: dict[str, Any], target: str, last: int) -> Table:
    """The last `last` test predictions next to the truth."""
    table = Table(title=f"last test samples: {target} one step ahead")
    for name in ("step", "true", "predicted"):
        table.add_column(name, justify="right")
    rows = list(zip(example["t"], example["truth"], example["pred"], strict=True))
    for t, truth, pred in rows[-last:]:
        table.add_row(str(int(t)), f"{truth:.3f}", f"{pred:.3f}")
    return table


def quantization_line(meta: dict[str, Any]) -> str:
    """Sizes and error change of an int8 export."""
    q = meta["quantization"]
    return (
        f"int8 ({q['scheme']}): weights {q['float_weight_bytes']:,} -> {q['int8_weight_bytes']:,} "
        f"bytes, file {meta['float_file_bytes']:,} bytes as float32; {q['metric']} on the "
        f"{q['measured_on']}: {q['float_error']:.4g} -> {q['int8_error']:.4g} "
        f"(limit +{q['max_error']:g})" + _whole_sequence(q)
    )


def _whole_sequence(q: dict[str, Any]) -> str:
    whole = q.get("onnxruntime_whole_sequence") or {}
    if not whole:
        return ""
    return (f"; ONNX Runtime on whole sequences (activations quantized over each): "
            f"{whole['float_error']:.4g} -> {whole['int8_error']:.4g}")  # fmt: skip


def int8_parity_line(q: dict[str, Any]) -> str:
    """The int8 file's own parity (quantize._own_parity), for the "wrote" line."""
    p = q["parity"]
    return (
        f"int8 file: edgeseq vs ONNX Runtime, both streamed, "
        f"{p['edgeseq_streamed_vs_onnxruntime_streamed']:.2e}; ONNX Runtime streamed vs its "
        f"whole-sequence run {p['onnxruntime_streamed_vs_whole_sequence']:.2e} over "
        f"{p['steps']} steps (normalized)"
    )
