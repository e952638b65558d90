"""The stream table on disk: `<state-dir>/state.npz`, restored at start, written periodically and
on the way out.

Writing is runtime/state_files.py's atomic snapshot (temp file, fsync, rename, fsync the
folder), so after
`kill -9` at any instant the file is the previous complete checkpoint or the new one. The
snapshot is taken between batches on the event loop (every state and its seq bookkeeping from
the same instant) and written from a worker thread, so serving goes on while the disk works.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from edgeseq.daemon.table import StreamTable
from edgeseq.errors import CheckpointError
from edgeseq.runtime.state_files import load_snapshot, save_snapshot

log = logging.getLogger("edgeseq.daemon")
STATE_FILE = "state.npz"


class Checkpointer:
    def __init__(self, state_dir: str | Path, table: StreamTable) -> None:
        self.dir, self.table = Path(state_dir), table
        table.durable = True  # answers say what the last checkpoint holds
        self.path = self.dir / STATE_FILE
        self.last: float | None = None  # monotonic time of the last complete checkpoint
        self.written = 0
        self._lock = asyncio.Lock()
        self._inflight: asyncio.Future | None = None

    def prepare(self) -> None:
        """Create the folder; remove temp files a killed writer left behind (never complete)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot create state dir {self.dir}: {exc.strerror}") from None
        for leftover in self.dir.glob(f".{STATE_FILE}.*.partial"):
            leftover.unlink(missing_ok=True)

    def restore(self, reset_on_model_change: bool) -> int:
        """Load the last checkpoint into the table; the number of streams restored."""
        if not self.path.exists():
            return 0
        snap = load_snapshot(self.path, None)  # validated; the fingerprint is checked below
        fingerprint = self.table.model.fingerprint
        if snap.fingerprint != fingerprint:
            if not reset_on_model_change:
                raise CheckpointError(
                    f"{self.path} holds states of model {snap.fingerprint[:12]}, but the model "
                    f"loaded is {fingerprint[:12]}; start with --reset-on-model-change to "
                    "discard those states"
                )
            aside = self.path.with_name(f"{STATE_FILE}.{snap.fingerprint[:12]}.discarded")
            self.path.replace(aside)
            log.warning(
                "model changed: saved states discarded",
                extra={"saved_model": snap.fingerprint[:12], "moved_to": str(aside)},
            )
            return 0
        try:
            self.table.restore(snap)  # its seq bookkeeping checked before any state is restored
        except CheckpointError as exc:
            raise CheckpointError(f"{self.path}: {exc}") from None
        self.last = time.monotonic()
        log.info("states restored", extra={"streams": len(snap.ids), "saved_at": snap.created})
        return len(snap.ids)

    def write_now(self) -> None:
        """Synchronous checkpoint (on shutdown)."""
        states, extra = self.table.snapshot()
        infos = dict(self.table.info)
        save_snapshot(self.path, self.table.model.fingerprint, states, extra)
        self.table.made_durable(extra, infos)
        self._done(len(states))

    async def write(self) -> None:
        """Snapshot now, write in a worker thread; one write at a time."""
        async with self._lock:
            states, extra = self.table.snapshot()
            infos = dict(self.table.info)  # these streams, as they are now
            fingerprint = self.table.model.fingerprint
            loop = asyncio.get_running_loop()
            self._inflight = loop.run_in_executor(
                None, save_snapshot, self.path, fingerprint, states, extra
            )
            await asyncio.shield(self._inflight)
            self.table.made_durable(extra, infos)
            self._done(len(states))

    async def settle(self) -> None:
        if self._inflight is not None and not self._inflight.done():
            await asyncio.wait([self._inflight])

    def _done(self, streams: int) -> None:
        self.last = time.monotonic()
        self.written += 1
        log.debug("checkpoint written", extra={"streams": streams, "path": str(self.path)})
