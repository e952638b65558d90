"""Prometheus metrics and the /healthz and /readyz probes, served from one small HTTP thread.

The registry is the daemon's own (not the process-global one), so tests can run several
daemons in one process. The HTTP server is prometheus_client's WSGI app behind a dispatcher for
the two probes, run by wsgiref in a daemon thread: scraping never waits on the event loop.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class BulkHistogram(Histogram):
    """A Histogram that also takes many observations in one call: the daemon counts a whole
    batch's latencies at once (a Python call per sample would cost more than the sample).
    It adds to the parent's own bucket and sum values (prometheus_client's attributes, pinned
    in constraints.txt), so the exposition is exactly a Histogram's."""

    def observe_many(self, amounts: list[float], counts: list[int]) -> None:
        """`counts[i]` observations of `amounts[i]` each."""
        bounds, buckets = self._upper_bounds, self._buckets
        total = 0.0
        for amount, count in zip(amounts, counts, strict=True):
            if count:
                buckets[bisect.bisect_left(bounds, amount)].inc(count)
                total += amount * count
        self._sum.inc(total)


class Metrics:
    """Every metric the daemon exports (names prefixed `edgeseq_`)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.samples = Counter("edgeseq_samples", "Samples answered, by outcome", ["outcome"],
                               registry=r)  # fmt: skip
        self.errors = Counter("edgeseq_errors", "Error answers, by code", ["code"], registry=r)
        self.batch = Histogram("edgeseq_batch_size", "Streams per pool step",
                               buckets=BATCH_BUCKETS, registry=r)  # fmt: skip
        self.step = Histogram("edgeseq_step_seconds", "Time of one batched pool step",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.latency = BulkHistogram("edgeseq_latency_seconds",
                                 "From a sample's arrival to its answer being sent",
                                 buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.streams = Gauge("edgeseq_active_streams", "Streams in the table", registry=r)
        self.evictions = Counter("edgeseq_evictions", "Streams dropped, by reason", ["reason"],
                                 registry=r)  # fmt: skip
        self.gaps = Counter("edgeseq_seq_gaps", "Samples whose seq skipped ahead", registry=r)
        self.queue = Gauge("edgeseq_queue_depth", "Samples waiting for a batch", registry=r)
        self.checkpoint_age = Gauge("edgeseq_checkpoint_age_seconds",
                                    "Seconds since the last complete checkpoint (-1: none yet)",
                                    registry=r)  # fmt: skip
        self.checkpoints = Counter("edgeseq_checkpoints", "Checkpoints written", registry=r)
        self.reloads = Counter("edgeseq_reloads", "Model reloads, by result", ["result"],
                               registry=r)  # fmt: skip
        self.model = Gauge("edgeseq_model_info", "The loaded model (value 1)",
                           ["fingerprint", "path"], registry=r)  # fmt: skip
        self.ready = False

    def set_model(self, fingerprint: str, path: str) -> None:
        self.model.clear()
        self.model.labels(fingerprint=fingerprint, path=path).set(1)

    def track(self, name: str, read: Callable[[], float]) -> None:
        """A gauge computed at scrape time (queue depth, checkpoint age, active streams)."""
        getattr(self, name).set_function(read)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds are not log lines."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def _app(metrics: Metrics) -> Callable[..., Iterable[bytes]]:
    prometheus = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            start("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            status = "200 OK" if metrics.ready else "503 Service Unavailable"
            start(status, [("Content-Type", "text/plain")])
            return [b"ready\n" if metrics.ready else b"model not loaded\n"]
        return prometheus(environ, start)

    return app


def serve_metrics(metrics: Metrics, host: str, port: int) -> _ThreadingServer:
    """Start the HTTP endpoint in a daemon thread; the server (its port, shutdown())."""
    server = make_server(host, port, _app(metrics), _ThreadingServer, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def age(since: Callable[[], float | None]) -> Callable[[], float]:
    def read() -> float:
        when = since()
        return -1.0 if when is None else time.monotonic() - when

    return read
