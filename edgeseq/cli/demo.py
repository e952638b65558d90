"""`make demo`: the main job end to end on built-in data, in one process.

Train a small LSTM forecaster on the pump data, export it to ONNX (parity proven), then load the
file with the streaming runtime, as a board would, and stream the whole recording through it one
sample at a time, timing each step. The run directory also gets the data as files, so every
example of the README has something real to read: `pump.csv` (the recording), and its samples
as the daemon's input, `samples.jsonl` (features by name) and `samples.csv` (`id,seq,...`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table


def _stream_recording(model_path: Path, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and per-step latencies (us) of the runtime streaming `samples`.

    Each sample is a row of the frame as NumPy hands it over (`to_numpy` of a frame is
    Fortran-ordered, so its rows are strided), as a user's loop would pass it; a latency is
    the `stream.step` call alone."""
    from edgeseq.runtime import load

    model = load(model_path)
    stream = model.stream()
    predictions = np.empty((len(samples), model.n_outputs), np.float32)
    latencies = np.empty(len(samples))
    clock = time.perf_counter_ns
    for t, sample in enumerate(samples):
        start = clock()
        y = stream.step(sample)
        latencies[t] = (clock() - start) / 1e3
        predictions[t] = y
    return predictions, latencies


def write_sample_files(frame: Any, feature_names: list[str], out: Path, stream_id: str) -> None:
    """`samples.jsonl` and `samples.csv`: the recording as one stream's wire messages.

    JSON lines name the features (the order cannot go wrong); the CSV has a header and the
    values in the model's feature order, as `--format csv` reads them."""
    rows = frame[feature_names].to_numpy(np.float64).round(6)
    with open(out / "samples.jsonl", "w") as lines:
        for seq, row in enumerate(rows):
            x = dict(zip(feature_names, row.tolist(), strict=True))
            lines.write(json.dumps({"id": stream_id, "seq": seq, "x": x}) + "\n")
    with open(out / "samples.csv", "w") as csv:
        csv.write(",".join(["id", "seq", *feature_names]) + "\n")
        for seq, row in enumerate(rows):
            csv.write(",".join([stream_id, str(seq), *(repr(v) for v in row.tolist())]) + "\n")


def run_demo(out: Path, epochs: int, console: Console, train_run: Any) -> None:
    from edgeseq.data.builtin import pump_frame
    from edgeseq.data.tables import Columns, from_frame
    from edgeseq.export.onnx_export import export_checkpoint
    from edgeseq.train.console import parity_line, predictions_table
    from edgeseq.train.pipeline import TrainConfig

    frame = pump_frame()
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "pump.csv", index=False)
    console.print(
        f"[bold]demo[/]: built-in pump data, {len(frame)} samples: {list(frame.columns)} "
        f"(written to {out / 'pump.csv'})"
    )
    columns = Columns(targets=("pressure",), features=("flow", "temperature"), time_col="t")
    data = from_frame(frame, columns, source="built-in pump data")
    cfg = TrainConfig(task="forecast", cell="lstm", hidden=32, epochs=epochs, window=64)
    result = train_run(data, cfg, out, None, False)
    console.print(predictions_table(result.evaluation.example, "pressure", last=5))
    with console.status("exporting to ONNX and proving parity..."):
        meta = export_checkpoint(out, out / "model.onnx")
    console.print(f"wrote {out / 'model.onnx'}: {parity_line(meta['parity'])}")

    write_sample_files(frame, list(meta["feature_names"]), out, "pump-1")
    console.print(
        f"wrote {out / 'samples.jsonl'} and {out / 'samples.csv'}: the recording as stream "
        "pump-1's messages for `edgeseq serve`"
    )
    samples = frame[list(meta["feature_names"])].to_numpy(np.float32)
    predictions, latencies = _stream_recording(out / "model.onnx", samples)
    table = Table(title="streamed by the runtime (edgeseq.load, one sample per step)")
    for name in ("step", *meta["feature_names"], "next pressure (predicted)", "step latency us"):
        table.add_column(name, justify="right")
    for t in range(len(samples) - 5, len(samples)):
        table.add_row(str(t), *(f"{v:.3f}" for v in samples[t]), f"{predictions[t, 0]:.3f}",
                      f"{latencies[t]:.1f}")  # fmt: skip
    console.print(table)
    console.print(
        f"{len(samples):,} samples streamed: per-sample latency median "
        f"{np.median(latencies):.1f} us, p99 {np.percentile(latencies, 99):.1f} us"
    )
