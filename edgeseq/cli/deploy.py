"""`edgeseq devices` and `edgeseq bundle`: board profiles, and a folder to copy to a board
(edgeseq.deploy does the work)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Opt = typer.Option


devices_app = typer.Typer(help="Board profiles in devices/: list them, or show one.",
                          invoke_without_command=True, no_args_is_help=False)  # fmt: skip


@devices_app.callback()
def devices(ctx: typer.Context) -> None:
    """List the board profiles (devices/*.toml)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console
    from rich.table import Table

    from edgeseq.deploy.devices import list_profiles

    table = Table("arch", "cpu", "cores", "memory MB", "python", "daemon memory MB")
    table.add_column("name", no_wrap=True)
    table.columns.insert(0, table.columns.pop())
    for p in list_profiles():
        limit = str(p.daemon.get("memory_limit_mb", "-"))
        table.add_row(p.name, p.arch, p.numba_cpu, str(p.cores), f"{p.memory_mb:,}", p.python,
                      limit)  # fmt: skip
    Console().print(table)


@devices_app.command("show")
def devices_show(name: Annotated[str, typer.Argument(help="A profile name.")]) -> None:
    """Print one board profile."""
    from edgeseq.deploy.devices import get_profile

    profile = get_profile(name)
    assert profile.path is not None
    print(profile.path.read_text(), end="")


def bundle(
    model: Annotated[Path, typer.Argument(help="The .onnx model to deploy.")],
    device: Annotated[str, Opt(help="Board profile (edgeseq devices).")],
    out: Annotated[Path, Opt("-o", "--out", help="Bundle folder to write (and FOLDER.tar.gz).")],
    sample_rate: Annotated[
        float | None, Opt(help="Samples per second per stream (default: the model's metadata).")
    ] = None,
) -> None:
    """Write a self-contained folder to copy to a board: model, tuned config, wheel, systemd unit,
    install.sh, README; warns with figures when the model does not fit the board."""
    from rich.console import Console

    from edgeseq.deploy.bundle import build_bundle
    from edgeseq.deploy.devices import get_profile

    console = Console()
    profile = get_profile(device)
    with console.status(f"bundling {model} for {device}..."):
        result = build_bundle(model, profile, out, sample_rate)
    fit = result.fit
    err = Console(stderr=True)
    for warning in fit.warnings:
        err.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
    console.print(
        f"{result.folder} ({len(result.files)} files) and {result.archive.name}: "
        f"about {fit.us_per_sample:,.0f} us per sample, {fit.memory_mb:.0f} MB on {device}",
        markup=False, highlight=False,
    )  # fmt: skip
