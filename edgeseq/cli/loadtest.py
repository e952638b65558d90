"""`edgeseq loadtest`: the command-line face of the load generator (edgeseq.bench.loadgen)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Opt = typer.Option


def loadtest(
    model: Annotated[Path, typer.Argument(help="The .onnx model to serve under load.")],
    streams: Annotated[int, Opt(help="Streams in the many-stream TCP workload.")] = 1000,
    connections: Annotated[int, Opt(help="TCP connections the streams share.")] = 4,
    seconds: Annotated[float, Opt(help="Seconds of each many-stream throughput run.")] = 10,
    soak: Annotated[float, Opt(help="Seconds of load sampling memory (0: none).")] = 600,
    solo: Annotated[float, Opt(help="Seconds of the one-stream closed loop.")] = 5,
    stdin_lines: Annotated[int, Opt(help="Lines piped through the daemon's stdin.")] = 200_000,
    mqtt: Annotated[bool, Opt("--mqtt/--no-mqtt", help="Measure MQTT via Mosquitto.")] = True,
    write: Annotated[Path | None, Opt(help="Add the section to this file (BENCHMARKS.md).")] = None,
) -> None:
    """Load-test `edgeseq serve` from a separate process, as clients use it: TCP (many streams,
    one stream), stdin and MQTT; beside a null server's rate (the generator's ceiling), the
    runtime's own, and the daemon's memory over a soak."""
    from rich.console import Console
    from rich.markdown import Markdown

    from edgeseq.bench.loadgen.run import Options, run
    from edgeseq.bench.loadgen.section import markdown, write_section

    options = Options(streams=streams, connections=connections, seconds=seconds, soak=soak,
                      solo=solo, stdin_lines=stdin_lines, mqtt=mqtt)  # fmt: skip
    console = Console()
    with console.status(f"edgeseq loadtest {model}...") as status:
        figures = run(model, options, say=status.update, note=console.log)
    report = markdown(figures)
    console.print(Markdown(report))
    if write is not None:
        write_section(write, report)
        console.print(f"wrote {write}")


def cluster_bench(
    model: Annotated[Path, typer.Argument(help="The .onnx model the daemons serve.")],
    streams: Annotated[int, Opt(help="Streams (each its own stream id).")] = 10_000,
    samples: Annotated[int, Opt(help="Samples per stream.")] = 100,
    write: Annotated[Path | None, Opt(help="Add the section to this file (BENCHMARKS.md).")] = None,
) -> None:
    """`edgeseq serve --nats` on a real 3-node JetStream cluster on 127.0.0.1: kill -9 of a
    daemon (and of a NATS server) halfway through, every answer checked against Stream.feed;
    the rate of one and of two daemons against the TCP daemon's, in the same run."""
    from rich.console import Console
    from rich.markdown import Markdown

    from edgeseq.bench.loadgen.cluster_bench import markdown, run, write_section

    console = Console()
    with console.status(f"edgeseq cluster-bench {model}...") as status:
        failovers, rates = run(model, streams, samples, say=status.update)
    report = markdown(model, failovers, rates)
    console.print(Markdown(report))
    if write is not None:
        write_section(write, report)
        console.print(f"wrote {write}")
