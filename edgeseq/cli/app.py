"""The `edgeseq` command: thin typer commands, lazy imports, one error boundary.

Every command imports what it needs inside its body, so `edgeseq --help` and `--version` stay
fast and never import torch. Errors become `error: ...` on stderr with the exception's exit code
(2 for bad input or usage); nothing below this module prints or exits.
"""

from __future__ import annotations

import logging
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markdown import Markdown

from edgeseq.cli import serve as serve_command
from edgeseq.cli.deploy import bundle, devices_app
from edgeseq.cli.loadtest import cluster_bench, loadtest
from edgeseq.cli.serve import serve
from edgeseq.errors import EdgeseqError, UsageError
from edgeseq.spec import TRANSFORMS
from edgeseq.version import __version__

if TYPE_CHECKING:  # the training side imports torch; the CLI loads it only when a command runs
    from edgeseq.data.tables import Dataset
    from edgeseq.train.pipeline import RunResult, TrainConfig

app = typer.Typer(
    name="edgeseq",
    help="Recurrent sequence models (RNN, LSTM, GRU) from training to streaming on edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


class Task(StrEnum):
    forecast = "forecast"
    classify = "classify"
    regress = "regress"
    seq2seq = "seq2seq"
    generate = "generate"


class Cell(StrEnum):
    rnn = "rnn"
    lstm = "lstm"
    gru = "gru"


TargetTransformName = StrEnum(  # type: ignore[misc]
    "TargetTransformName", {name: name for name in ("auto", *TRANSFORMS)}
)


class Fill(StrEnum):
    error = "error"
    ffill = "ffill"
    interpolate = "interpolate"
    zero = "zero"
    drop = "drop"


def _version(value: bool) -> None:
    if value:
        console.print(f"edgeseq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """edgeseq: train, export and stream recurrent models."""


def _names(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())


@app.command()
def train(
    csv: Annotated[Path, typer.Argument(help="CSV file of sensor readings, one row per sample.")],
    task: Annotated[Task, typer.Option(help="Task shape.")] = Task.forecast,
    cell: Annotated[Cell, typer.Option(help="Recurrent cell.")] = Cell.lstm,
    hidden: Annotated[int, typer.Option(help="Hidden units per layer.")] = 32,
    layers: Annotated[int, typer.Option(help="Stacked recurrent layers.")] = 1,
    epochs: Annotated[
        int, typer.Option(help="Maximum epochs (early stopping may end sooner).")
    ] = 200,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same data -> same model on CPU.")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Run directory \\[default: runs/<csv>-<task>-<cell>].")
    ] = None,
    features: Annotated[
        str | None,
        typer.Option(
            help="Input columns, comma-separated \\[default: every other numeric column]."
        ),
    ] = None,
    target: Annotated[
        str | None, typer.Option(help="Column(s) to predict, comma-separated.")
    ] = None,
    time_col: Annotated[
        str | None, typer.Option(help="Column that orders the rows (number or date).")
    ] = None,
    id_col: Annotated[
        str | None, typer.Option(help="Column naming the recording each row belongs to.")
    ] = None,
    label_col: Annotated[
        str | None, typer.Option(help="Column of class labels (classify).")
    ] = None,
    test_csv: Annotated[
        Path | None, typer.Option(help="Separate test file \\[default: hold out part of CSV].")
    ] = None,
    window: Annotated[int | None, typer.Option(help="Training window length in steps.")] = None,
    stride: Annotated[
        int | None,
        typer.Option(help="Steps between windows \\[default: 1, or coarser above 4096 windows]."),
    ] = None,
    horizon: Annotated[int, typer.Option(help="Steps ahead to predict (forecast, seq2seq).")] = 1,
    tbptt: Annotated[
        int | None,
        typer.Option(help="Truncated BPTT: chunk length K; state carried across chunks."),
    ] = None,
    clip: Annotated[float, typer.Option(help="Clip the gradient norm to this (0: off).")] = 1.0,
    clip_value: Annotated[
        float | None, typer.Option(help="Also clip each gradient element to +-this.")
    ] = None,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 3e-3,
    batch_size: Annotated[int, typer.Option(help="Windows per update.")] = 16,
    patience: Annotated[int, typer.Option(help="Early stopping: epochs without improvement.")] = 30,
    dropout: Annotated[float, typer.Option(help="Dropout between stacked layers.")] = 0.0,
    relu: Annotated[
        bool, typer.Option("--relu", help="Elman RNN with ReLU instead of tanh.")
    ] = False,
    val_size: Annotated[
        float,
        typer.Option(
            help="Validation share (<1) or count (>=1): rows for one series, recordings otherwise."
        ),
    ] = 0.15,
    test_size: Annotated[
        float, typer.Option(help="Test share (<1) or count (>=1), as --val-size.")
    ] = 0.15,
    season: Annotated[
        int | None,
        typer.Option(
            help="Season length in steps: the seasonal-persistence baseline, and the seasonal "
            "target transforms."
        ),
    ] = None,
    target_transform: Annotated[
        TargetTransformName,
        typer.Option(
            help="forecast, seq2seq: what the network predicts. diff: the change from the last "
            "value; log-diff: of its log; seasonal: the change from one --season back; auto: "
            "the best of these on the validation split (one training run each)."
        ),
    ] = TargetTransformName("auto"),
    fill: Annotated[
        Fill, typer.Option(help="Missing values: error, or how to fill them.")
    ] = Fill.error,
    threads: Annotated[int, typer.Option(help="Torch CPU threads.")] = 1,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last epoch.")
    ] = False,
) -> None:
    """Train a recurrent model on a CSV and evaluate it against a naive baseline."""
    from edgeseq.data.tables import Columns, load_csv
    from edgeseq.train.pipeline import TrainConfig

    if task.value != "classify" and not target:  # said before reading data or any progress
        raise UsageError(f"task {task.value} needs --target (the column(s) to predict)")
    if task.value == "classify" and not label_col:
        raise UsageError("task classify needs --label-col (the column holding each label)")

    columns = Columns(
        targets=_names(target) or (),
        features=_names(features),
        time_col=time_col,
        id_col=id_col,
        label_col=label_col,
    )
    data = load_csv(csv, columns, fill=fill.value)
    test = load_csv(test_csv, data.columns, fill=fill.value) if test_csv else None
    cfg = TrainConfig(
        task=task.value, cell=cell.value, hidden=hidden, layers=layers, epochs=epochs, seed=seed,
        horizon=horizon, window=window, stride=stride, tbptt=tbptt, clip=clip,
        clip_value=clip_value, lr=lr, batch_size=batch_size, patience=patience, dropout=dropout,
        nonlinearity="relu" if relu else "tanh", val_size=val_size, test_size=test_size,
        season=season, threads=threads, target_transform=str(target_transform),
    )  # fmt: skip
    run_dir = out or Path("runs") / f"{csv.stem}-{task.value}-{cell.value}"
    _run_training(data, cfg, run_dir, test, resume)


def _run_training(
    data: Dataset, cfg: TrainConfig, run_dir: Path, test: Dataset | None, resume: bool
) -> RunResult:
    from edgeseq.train.console import confusion_table, epoch_progress, metrics_table
    from edgeseq.train.pipeline import train as fit_run

    with epoch_progress(console, cfg.epochs) as on_epoch:
        result = fit_run(
            data,
            cfg,
            run_dir,
            test=test,
            command=["edgeseq", *sys.argv[1:]],
            resume=resume,
            on_epoch=on_epoch,
            on_phase=on_epoch.phase,
        )
    console.print(metrics_table(result.metrics))
    if cfg.task == "classify":
        console.print(confusion_table(result.metrics["test"]))
    console.print(f"run directory: {result.run_dir} (checkpoint.pt, metrics.json, plot.png)")
    return result


@app.command()
def export(
    source: Annotated[Path, typer.Argument(help="Run directory or checkpoint.pt from `train`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .onnx file to write.")],
    quantize: Annotated[
        str | None, typer.Option(help="int8: store int8 weights (about 4x smaller).")
    ] = None,
    max_error: Annotated[
        float,
        typer.Option(help="int8 only: refuse if the held-out error grows by more than this."),
    ] = 0.02,
) -> None:
    """Export a trained model to one verified, self-describing ONNX file."""
    from edgeseq.export.onnx_export import export_checkpoint
    from edgeseq.train.console import int8_parity_line, parity_line, quantization_line

    with console.status("exporting and proving parity with ONNX Runtime..."):
        meta = export_checkpoint(source, output, quantize=quantize, max_error=max_error)
    proof = parity_line(meta["parity"])
    if "quantization" in meta:  # the int8 file's own figures, not its float twin's
        console.print(quantization_line(meta))
        proof = f"{int8_parity_line(meta['quantization'])}; float model: {proof}"
    console.print(f"wrote {output} ({output.stat().st_size:,} bytes): {proof}")


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="An .onnx file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Show an ONNX model's inputs, outputs, nodes, size and edgeseq metadata."""
    import json

    from edgeseq.cli.inspection import describe
    from edgeseq.train.console import inspect_tables

    info = describe(model)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    for table in inspect_tables(info):
        console.print(table)


@app.command()
def replay(
    recipes: Annotated[
        list[Path], typer.Argument(help="Recipe TOML files (export/recipes/*.toml).")
    ],
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Where models and goldens go.")] = Path(
        "export"
    ),
) -> None:
    """Rebuild reference models from their recipes: train, export, write golden I/O."""
    from edgeseq.export.recipes import replay as replay_recipe

    if not out_dir.is_dir():  # before minutes of training, not after
        raise UsageError(f"--out-dir {out_dir} is not a folder; create it first")
    missing = [str(r) for r in recipes if not r.is_file()]
    if missing:
        raise UsageError(f"no such recipe file: {', '.join(missing)}")

    for recipe in recipes:
        with console.status(f"replaying {recipe}..."):
            path = replay_recipe(recipe, out_dir)
        console.print(f"{recipe} -> {path} ({path.stat().st_size:,} bytes)")


@app.command()
def bench(
    models: Annotated[list[Path], typer.Argument(help="ONNX models to measure.")],
    write: Annotated[
        Path | None, typer.Option(help="Also write the report (BENCHMARKS.md).")
    ] = None,
    calls: Annotated[int, typer.Option(help="Timed single-step calls per backend.")] = 20_000,
    models_in: Annotated[
        Path | None,
        typer.Option(
            help="Also tabulate every model in this folder: plan, step, feed, "
            "resident weights, speed against its float twin."
        ),
    ] = None,
) -> None:
    """Measure step latency, throughput, start-up and memory per backend, as ratios."""
    from edgeseq.bench.markdown import markdown
    from edgeseq.bench.measure import measure

    results = []
    for model in models:
        with console.status(f"measuring {model} (cold start compiles the kernels)..."):
            results.append(measure(model, calls=calls))
    command = "edgeseq bench " + " ".join(map(str, models))
    command += f" --models-in {models_in}" if models_in is not None else ""
    report = markdown(results, command)
    if models_in is not None:
        from edgeseq.bench import models_table

        with console.status(f"measuring every model in {models_in}..."):
            rows = models_table.measure_folder(models_in)
        report += "\n" + models_table.markdown(rows, models_in)
    console.print(Markdown(report))
    if write is not None:
        from edgeseq.bench.loadgen.section import keep_load_section

        write.write_text(keep_load_section(write, report))
        console.print(f"wrote {write}")


@app.command()
def warmup(
    models: Annotated[
        list[Path] | None, typer.Argument(help="Models to load and plan too.")
    ] = None,
) -> None:
    """Compile and cache every Numba kernel for this CPU, so a service starts in about a second."""
    import time

    from edgeseq.runtime.warmup import warm

    start = time.perf_counter()
    with console.status("compiling the kernels for this CPU (the first time takes a while)..."):
        names = warm(models or [])
    console.print(f"kernels ready ({', '.join(names)}) in {time.perf_counter() - start:.1f} s")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run directory for the demo.")] = Path("runs/demo"),
    epochs: Annotated[int, typer.Option(help="Maximum epochs.")] = 60,
) -> None:
    """Train, export and stream a small LSTM forecaster on built-in pump data, end to end."""
    from edgeseq.cli.demo import run_demo

    run_demo(out, epochs, console, _run_training)


app.command()(serve)
app.command()(loadtest)
app.command("cluster-bench")(cluster_bench)
app.command()(bundle)
app.add_typer(devices_app, name="devices")


def main(argv: list[str] | None = None) -> int:
    """Run the app; every expected failure becomes one `error: ...` line and an exit code."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="edgeseq", standalone_mode=False)
    except EdgeseqError as exc:
        _error(str(exc))
        return exc.exit_code
    except typer.Exit as exc:  # --help, --version
        return exc.exit_code
    except typer.TyperException as exc:  # usage errors: unknown option, bad option value
        _error(exc.format_message())
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        _error("interrupted")
        return 130
    return result if isinstance(result, int) else 0


def _error(message: str) -> None:
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)


def _say_what_the_runtime_does() -> None:
    """The runtime's notices (a first compile, compile_notice.py) as lines on stderr; `serve`
    replaces this with its own log format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("edgeseq: %(message)s"))
    runtime = logging.getLogger("edgeseq.runtime")
    runtime.addHandler(handler)
    runtime.setLevel(logging.INFO)


def run() -> None:
    """Console-script target (and `python -m edgeseq`): this process is the command, so `edgeseq
    serve` may replace it by a fresh one after compiling its kernels (cli/serve.py)."""
    serve_command.OWN_PROCESS = True
    _say_what_the_runtime_does()
    sys.exit(main())
