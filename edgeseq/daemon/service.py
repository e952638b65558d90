"""The daemon's life: load the model, restore states, open the inputs, serve until told to stop,
then answer what is queued and write a last checkpoint.

Signals: SIGTERM/SIGINT stop cleanly; SIGHUP (or a change of the model file with --watch)
reloads the model without dropping a connection. Periodic work (idle expiry, checkpoints, the
systemd watchdog, the model-file watch) runs as tasks on the same event loop as the batcher, so
it always sees the table between two batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from edgeseq import config as settings  # `config` is the daemon's settings here
from edgeseq.daemon.batcher import Batcher
from edgeseq.daemon.checkpointing import Checkpointer
from edgeseq.daemon.options import DaemonConfig, parse_address
from edgeseq.daemon.prometheus import Metrics, age, serve_metrics
from edgeseq.daemon.resident import resident_mib
from edgeseq.daemon.systemd import Notifier
from edgeseq.daemon.table import StreamTable
from edgeseq.errors import EdgeseqError
from edgeseq.runtime import Model, load
from edgeseq.runtime.kernels.compiler_memory import count_compiles, release_compiler_pages
from edgeseq.runtime.planning.specialize import kernels_are_kept
from edgeseq.runtime.warmup import step_every_pool_path

log = logging.getLogger("edgeseq.daemon")


def one_kernel_thread() -> None:
    """Pool steps on the daemon's own thread, unless NUMBA_NUM_THREADS (a board profile's
    `threads`) or OPENBLAS_NUM_THREADS asks for more. A parallel step waits for its slowest
    thread, so one core busy elsewhere (a broker, a sensor's code, a load generator) stalls
    every step: measured on 2 cores beside a load generator, 1,000 streams over TCP ran at
    25-40k samples/s with two threads against 140-177k with one. The kernels are a tenth of the
    daemon's work per sample; the rest is Python on one thread anyway."""
    import numba

    from edgeseq.runtime.pools import blas

    if not os.environ.get("NUMBA_NUM_THREADS"):
        numba.set_num_threads(1)
    if not os.environ.get("OPENBLAS_NUM_THREADS"):
        blas.set_threads(1)


GC_YOUNG = 20_000  # container allocations between young collections (Python's default: 700)


def settle_garbage_collector() -> None:
    """Everything loaded so far (the model, Numba's and LLVM's objects: some hundred thousand)
    lives as long as the process: freeze it out of the collector's sight, and collect the young
    generation less often. Serving allocates a few containers per sample (a parsed message, its
    answer), and with every collection walking the whole heap that cost 40% of the daemon's time
    (1,000,000 stdin lines: 5.9 s, 3.3-3.6 s frozen). Cycles are still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.notifier = Notifier()
        self.compiled = 0  # kernels the last _load compiled rather than loaded: see serve()
        self.model = self._load()
        self.metrics.set_model(self.model.fingerprint, str(self.config.model))
        self.table = StreamTable(self.model, config.max_streams)
        self.table.on_step = self._stepped
        self.table.on_event = self._event
        self.checkpointer = (
            Checkpointer(config.state_dir, self.table) if config.state_dir is not None else None
        )
        self.transports: list[Any] = []
        self.stopping = asyncio.Event()
        self._reloading = False
        self._background: set[asyncio.Future[Any]] = set()
        self.batcher: Batcher | None = None
        self.exit_code = 0

    def _load(self) -> Model:
        """The model file loaded and every kernel it serves with compiled (or loaded from the
        cache): its stream's, and a scratch pool's on each path a batch can take. A reload runs
        this in a worker thread while the event loop keeps answering with the old model, so
        the swap finds the new one ready and no request waits for a compiler."""
        one_kernel_thread()  # per thread in Numba: a reload runs in a worker thread
        start = time.perf_counter()
        with count_compiles() as compiled:
            model = load(self.config.model, self.config.backend)
            model.stream()  # refuses a model that cannot stream (bidirectional...) now, not later
            step_every_pool_path(model)  # batched kernels ready now, not in a client's request
        self.compiled = compiled.count
        release_compiler_pages()  # LLVM's pages are not needed again until the next compile
        seconds = round(time.perf_counter() - start, 3)
        fields = {"path": self.config.model, "fingerprint": model.fingerprint[:12]}
        notes = {"plan": model.plan_note, "pools": model.pool_note}
        log.info("model loaded", extra={**fields, "seconds": seconds, "compiled": self.compiled,
                                        **notes})  # fmt: skip
        return model

    def _stepped(self, streams: int, seconds: float) -> None:
        self.metrics.batch.observe(streams)
        self.metrics.step.observe(seconds)

    def _event(self, event: str, label: str) -> None:
        if event == "gap":
            self.metrics.gaps.inc()
        elif event == "eviction":
            self.metrics.evictions.labels(label).inc()

    async def run(self) -> int:
        """Serve until stopped; the exit code."""
        loop = asyncio.get_running_loop()
        self.batcher = batcher = Batcher(self.config, self.table, self.metrics)
        if self.checkpointer is not None:
            self.checkpointer.prepare()
            self.checkpointer.restore(self.config.reset_on_model_change)
        self._track()
        metrics_server = self._serve_metrics()
        await self._open_transports(batcher)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        tasks = [asyncio.create_task(batcher.run(), name="batcher")]
        tasks += [asyncio.create_task(job(), name=job.__name__) for job in self._periodic()]
        settle_garbage_collector()
        if await self._connected():
            self.metrics.ready = True
            self.notifier.ready(f"serving {os.path.basename(self.config.model)}")
            log.info("ready", extra={"streams": len(self.table), "pid": os.getpid()})
        await self.stopping.wait()
        await self._shutdown(tasks, batcher)
        if metrics_server is not None:
            metrics_server.shutdown()
        return self.exit_code

    async def _connected(self) -> bool:
        """Wait until every transport can take samples (an MQTT broker may not be up yet),
        saying what for; False when told to stop first. The others serve meanwhile."""
        waits = [w for t in self.transports if (w := t.waiting_for()) is not None]
        if not waits:
            return True
        log.info(f"waiting for {', '.join(waits)}")
        ready = asyncio.ensure_future(asyncio.gather(*(t.until_ready() for t in self.transports)))
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({ready, stop}, return_when=asyncio.FIRST_COMPLETED)
        for task in (ready, stop):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return not self.stopping.is_set()

    def _track(self) -> None:
        self.metrics.track("streams", lambda: len(self.table))
        self.metrics.track("queue", lambda: self.batcher.queued if self.batcher else 0)
        checkpointer = self.checkpointer
        last = (lambda: checkpointer.last) if checkpointer is not None else (lambda: None)
        self.metrics.track("checkpoint_age", age(last))

    def _serve_metrics(self) -> Any:
        if self.config.metrics is None:
            return None
        host, port = parse_address(self.config.metrics, "metrics", None)
        try:
            server = serve_metrics(self.metrics, host, port)
        except OSError as exc:
            raise EdgeseqError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
        log.info("metrics", extra={"host": host, "port": server.server_port})
        return server

    async def _open_transports(self, batcher: Batcher) -> None:
        status = {"model": self.model.fingerprint[:12], "pid": os.getpid()}
        if self.config.listen is not None:
            from edgeseq.daemon.transports.tcp import TcpTransport

            host, port = parse_address(self.config.listen, "listen", "tcp")
            self.transports.append(TcpTransport(batcher, host, port))
        if self.config.mqtt is not None:
            from edgeseq.daemon.transports.mqtt import MqttTransport

            host, port = parse_address(self.config.mqtt, "mqtt", "mqtt")
            self.transports.append(MqttTransport(batcher, host, port, status))
        if self.config.nats is not None:
            from edgeseq.daemon.transports.nats import NatsTransport

            self.transports.append(NatsTransport(batcher, status, self._fail))
        if not self.transports:
            from edgeseq.daemon.transports.stdin import StdinTransport

            stdin = StdinTransport(batcher)
            self.transports.append(stdin)
            self._spawn(self._stop_after(stdin.finished.wait()))
        for transport in self.transports:
            try:
                await transport.start()
            except OSError as exc:
                raise EdgeseqError(f"cannot open {type(transport).__name__}: {exc}") from None

    def _fail(self, exc: BaseException) -> None:
        """A transport cannot go on (a checkpoint of another model, a cluster of another
        layout): say why, and stop with exit code 1."""
        log.error("cannot serve", extra={"detail": str(exc)})
        self.exit_code = 1
        self.stopping.set()

    async def _stop_after(self, event: Awaitable[Any]) -> None:
        await event
        self.stopping.set()

    def _periodic(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        jobs: list[Callable[[], Coroutine[Any, Any, None]]] = [self._expire_idle]
        if self.checkpointer is not None:
            jobs.append(self._checkpoint_periodically)
        if self.notifier.watchdog_interval is not None:
            jobs.append(self._watchdog)
        if self.config.watch:
            jobs.append(self._watch_model)
        return jobs

    async def _expire_idle(self) -> None:
        every = min(self.config.idle_timeout / 4, 5.0)
        while True:
            await asyncio.sleep(every)
            self.table.expire(self.config.idle_timeout)

    async def _checkpoint_periodically(self) -> None:
        assert self.checkpointer is not None
        while True:
            await asyncio.sleep(self.config.checkpoint_interval)
            try:
                await self.checkpointer.write()
                self.metrics.checkpoints.inc()
            except EdgeseqError as exc:
                log.error("checkpoint failed", extra={"detail": str(exc)})

    async def _watchdog(self) -> None:
        assert self.notifier.watchdog_interval is not None
        while True:
            self.notifier.ping()
            await asyncio.sleep(self.notifier.watchdog_interval)

    async def _watch_model(self) -> None:
        def signature() -> tuple[int, int, int] | None:
            try:
                st = os.stat(self.config.model)
            except OSError:
                return None
            return st.st_ino, st.st_mtime_ns, st.st_size

        seen = signature()
        while True:
            await asyncio.sleep(self.config.watch_interval)
            now = signature()
            if now is not None and now != seen:
                seen = now
                await self.reload()

    async def reload(self) -> bool:
        """Load the model file again; the table moves over (states kept if their shapes match).

        Loading and compiling run in a worker thread (_load) while the old model keeps
        answering; the swap happens between two batches, once the new model is ready."""
        if self._reloading:
            return False
        self._reloading = True
        self.notifier.reloading()
        log.info(
            "reloading", extra={"path": self.config.model, "serving": self.model.fingerprint[:12]}
        )
        try:
            loop = asyncio.get_running_loop()
            model = await loop.run_in_executor(None, self._load)
        except EdgeseqError as exc:
            self.metrics.reloads.labels("failed").inc()
            log.error("reload failed; the previous model keeps serving", extra={"detail": str(exc)})
            return False
        finally:
            self._reloading = False
            self.notifier.ready("serving")
        old = self.model.fingerprint
        kept = self.table.swap_model(model)
        self.model = model
        self.metrics.set_model(model.fingerprint, str(self.config.model))
        self.metrics.reloads.labels("ok").inc()
        level = logging.INFO if kept else logging.WARNING
        log.log(level, "model reloaded" if kept else "model reloaded; state shapes differ, "
                "every stream was reset", extra={"old": old[:12], "new": model.fingerprint[:12],
                                                  "streams": len(self.table)})  # fmt: skip
        if self.compiled:  # a new model shape: a restart would load them from the cache
            log.warning(
                "the reload compiled kernels, and the compiler's memory stays with this process "
                "until it is restarted",
                extra={"kernels": self.compiled, "rss_mib": resident_mib()},
            )
        return True

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _shutdown(self, tasks: list[asyncio.Task[Any]], batcher: Batcher) -> None:
        self.notifier.stopping()
        log.info("stopping", extra={"queued": batcher.queued})
        for transport in self.transports:
            if hasattr(transport, "server") and transport.server is not None:
                transport.server.close()  # no new connections
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # a failed task must not cost the final checkpoint
                log.error("task failed", extra={"detail": f"{type(exc).__name__}: {exc}"})
        for transport in self.transports:  # what was read is answered; nothing more is read
            if hasattr(transport, "stop_reading"):
                transport.stop_reading()
        batcher.drain_all()
        if self.checkpointer is not None:
            try:
                await self.checkpointer.settle()
                self.checkpointer.write_now()
            except EdgeseqError as exc:
                log.error("final checkpoint failed", extra={"detail": str(exc)})
        for transport in self.transports:  # answers are written: close connections first, as
            if hasattr(transport, "close_connections"):  # Python 3.12's wait_closed() waits
                transport.close_connections()  # for every open connection
            if hasattr(transport, "stop"):
                await transport.stop()
        log.info("stopped", extra={"streams": len(self.table)})


def serve(config: DaemonConfig, start_afresh: Callable[[], None] | None = None) -> int:
    """Run the daemon in this thread until SIGTERM/SIGINT (or end of stdin).

    `start_afresh` (the command line's: cli/serve.py) replaces this process by a new one with
    the same arguments and SERVE_AFRESH set (edgeseq.config). It is called when loading the
    model compiled kernels (a cold Numba cache), before anything is opened, read or restored:
    compiling leaves LLVM's structures in the process for good (runtime/kernels/
    compiler_memory.py), and a daemon runs for months. The new process loads the kernels from
    the cache. Not when the kernels could not be kept (the new process would compile them all
    again), and never twice. Should it return (it could not start the new process), this one
    serves on."""

    async def main() -> int:
        daemon = Daemon(config)
        if daemon.compiled:  # by the load at start: nothing is open or read yet
            _after_compiling_at_start(daemon.compiled, start_afresh)
        return await daemon.run()

    return asyncio.run(main())


def _after_compiling_at_start(kernels: int, start_afresh: Callable[[], None] | None) -> None:
    fields = {"kernels": kernels, "rss_mib": resident_mib()}
    if settings.ENV.serve_afresh:
        log.warning(
            "kernels compiled again after starting afresh: the Numba cache is not kept "
            "(are NUMBA_CACHE_DIR and EDGESEQ_KERNEL_DIR writable?)",
            extra=fields,
        )
    elif not kernels_are_kept():
        log.warning(
            "kernels compiled at start into a folder of this process only (the kernel "
            "folder is not writable): serving from this process",
            extra=fields,
        )
    elif start_afresh is not None:
        log.info(
            "kernels compiled at start; starting afresh to leave the compiler's memory behind",
            extra=fields,
        )
        start_afresh()
