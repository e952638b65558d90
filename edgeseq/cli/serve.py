"""`edgeseq serve`: the command-line face of the daemon (edgeseq.daemon does the work).

Every option defaults to "not given", so that a `--config` file's value stands unless the
command line overrides it. Nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

Opt = typer.Option
OWN_PROCESS = False  # set by cli.run(): `edgeseq ...` is this process's command


def _may_start_afresh(config: Path | None) -> bool:
    """Whether `edgeseq serve` may replace this process by a new one with the same arguments:
    only when it is this process's own command (cli.run, not `cli.main([...])` called from other
    Python code, whose process must never be re-run) and its --config can be read again (not a
    pipe such as /dev/stdin)."""
    return OWN_PROCESS and (config is None or config.is_file())


def _start_afresh() -> None:
    """Replace this process by the same command (same PID, same open stdin): see
    edgeseq.daemon.service.serve. Returns only when that fails."""
    from edgeseq.config import SERVE_AFRESH

    os.environ[SERVE_AFRESH] = "1"  # read by the new process
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        os.execv(sys.executable, sys.orig_argv)
    except (OSError, ValueError) as exc:
        os.environ.pop(SERVE_AFRESH, None)
        logging.getLogger("edgeseq.daemon").warning(
            "could not start afresh; serving from this process", extra={"detail": str(exc)}
        )


def serve(
    model: Annotated[Path | None, typer.Argument(help="The .onnx model to serve.")] = None,
    config: Annotated[Path | None, Opt(help="TOML file of settings (keys as the options).")] = None,
    listen: Annotated[
        str | None, Opt(help="tcp://HOST:PORT for many clients (port 0: any).")
    ] = None,
    mqtt: Annotated[str | None, Opt(help="mqtt://HOST:PORT of a broker to serve through.")] = None,
    mqtt_in: Annotated[str | None, Opt(help="Sample topic; '+' is the stream id.")] = None,
    mqtt_out: Annotated[str | None, Opt(help="Answer topic; {id} is the stream id.")] = None,
    mqtt_status: Annotated[str | None, Opt(help="Retained status topic (with last will).")] = None,
    mqtt_qos: Annotated[int | None, Opt(help="QoS 0 or 1.")] = None,
    mqtt_client_id: Annotated[str | None, Opt(help="Client id (the persistent session).")] = None,
    nats: Annotated[
        str | None, Opt(help="nats://HOST:PORT[,...] of a JetStream cluster to serve through.")
    ] = None,
    nats_partitions: Annotated[int | None, Opt(help="Partitions of the streams (64).")] = None,
    nats_replicas: Annotated[int | None, Opt(help="JetStream replicas: 1, 3 or 5.")] = None,
    nats_name: Annotated[str | None, Opt(help="This daemon's name in the cluster.")] = None,
    format: Annotated[str | None, Opt(help="stdin format: json or csv (id,seq,x1..xn).")] = None,
    backend: Annotated[str | None, Opt(help="numba, numpy or onnxruntime.")] = None,
    max_streams: Annotated[int | None, Opt(help="Capacity of the stream table.")] = None,
    idle_timeout: Annotated[str | None, Opt(help="Evict streams idle this long (10m).")] = None,
    max_batch: Annotated[int | None, Opt(help="Most samples in one batched step.")] = None,
    max_wait: Annotated[str | None, Opt(help="Wait this long to gather a batch (1ms).")] = None,
    queue_size: Annotated[int | None, Opt(help="Samples waiting at most (backpressure).")] = None,
    max_line_bytes: Annotated[int | None, Opt(help="Longest accepted message.")] = None,
    state_dir: Annotated[str | None, Opt(help="Checkpoint stream states in this folder.")] = None,
    checkpoint_interval: Annotated[str | None, Opt(help="Checkpoint every (30s).")] = None,
    reset_on_model_change: Annotated[
        bool | None, Opt("--reset-on-model-change", help="Discard states of another model.")
    ] = None,
    watch: Annotated[
        bool | None, Opt("--watch", help="Reload when the model file changes.")
    ] = None,
    metrics: Annotated[str | None, Opt(help="HOST:PORT for Prometheus /metrics, /healthz.")] = None,
    log_level: Annotated[str | None, Opt(help="debug, info, warning or error.")] = None,
    log_format: Annotated[str | None, Opt(help="json or text.")] = None,
) -> None:
    """Serve a model to many streams: JSON lines on stdin (default), TCP, MQTT or NATS."""
    given = dict(locals())  # every option, None where not given
    from edgeseq.daemon.logs import configure
    from edgeseq.daemon.options import build_config
    from edgeseq.daemon.service import serve as run_daemon

    overrides = {k: v for k, v in given.items() if k not in {"config", "model"}}
    overrides["model"] = str(model) if model is not None else None
    settings = build_config(config, overrides)
    configure(settings.log_level, settings.log_format)
    code = run_daemon(settings, start_afresh=_start_afresh if _may_start_afresh(config) else None)
    if code:
        raise typer.Exit(code)
