"""One partition's stream states in the checkpoints bucket: key ckpt.<p>, the same pickle-free
snapshot format and model fingerprint as `--state-dir` (runtime/state_files.py), with the
table's seq bookkeeping and, beside it, the sample stream's sequence the states cover.

Writes are compare-and-set on the revision this daemon last read or wrote: a daemon that lost a
partition without noticing (paused longer than the lease TTL) cannot overwrite the checkpoint of
the daemon that took it over. Values are untrusted like any file: validated before use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from edgeseq.errors import CheckpointError
from edgeseq.runtime.state_files import Snapshot, read_snapshot_bytes, snapshot_bytes

log = logging.getLogger("edgeseq.daemon")
OURS = ("partition", "covers", "owner")  # what a partition's checkpoint adds to `extra`


class Superseded(Exception):
    """Another daemon wrote this partition's checkpoint: the partition is no longer ours."""


@dataclass
class Restored:
    snapshot: Snapshot | None  # None: no checkpoint yet (or discarded: another model's)
    covers: int  # stream sequence of the last sample the states include (0: none)


class PartitionCheckpoints:
    def __init__(
        self, kv: Any, fingerprint: str, owner: str, reset_on_model_change: bool, max_value: int
    ) -> None:
        self.kv, self.fingerprint, self.owner = kv, fingerprint, owner
        self.reset_on_model_change, self.max_value = reset_on_model_change, max_value
        self.revisions: dict[int, int] = {}  # partition -> revision last read or written
        self.written = 0

    @staticmethod
    def key(partition: int) -> str:
        return f"ckpt.{partition}"

    async def read(self, partition: int) -> Restored:
        """The partition's checkpoint, validated; its states stay of this model."""
        try:
            entry = await self.kv.get(self.key(partition))
        except KeyNotFoundError:
            self.revisions[partition] = 0
            return Restored(None, 0)
        self.revisions[partition] = entry.revision or 0
        what = f"checkpoint {self.key(partition)}"
        snap = read_snapshot_bytes(entry.value or b"", None, what)
        covers = _ours(snap, partition, what)
        if snap.fingerprint != self.fingerprint:
            if not self.reset_on_model_change:
                raise CheckpointError(
                    f"{what} holds states of model {snap.fingerprint[:12]}, but the model loaded "
                    f"is {self.fingerprint[:12]}; serve with --reset-on-model-change to discard "
                    "those states"
                )
            log.warning(
                "model changed: partition's saved states discarded",
                extra={"partition": partition, "saved_model": snap.fingerprint[:12]},
            )
            return Restored(None, covers)
        return Restored(snap, covers)

    async def write(
        self, partition: int, states: dict[str, Any], extra: dict[str, Any], covers: int
    ) -> int:
        """Write the partition's states covering stream sequence `covers`; its size in bytes.
        Raises Superseded when another daemon wrote it since we read or wrote it."""
        extra = {**extra, "partition": partition, "covers": covers, "owner": self.owner}
        value = snapshot_bytes(self.fingerprint, states, extra)
        if len(value) > self.max_value:
            raise CheckpointError(
                f"partition {partition}'s checkpoint of {len(states):,} streams is "
                f"{len(value):,} bytes; the cluster takes values up to {self.max_value:,} "
                "(max_payload): use more partitions, or raise max_payload"
            )
        last = self.revisions.get(partition, 0)
        try:
            self.revisions[partition] = await self.kv.update(self.key(partition), value, last=last)
        except KeyWrongLastSequenceError:
            if not await self._ours_anyway(partition, covers):
                raise Superseded(partition) from None
        self.written += 1
        return len(value)

    async def _ours_anyway(self, partition: int, covers: int) -> bool:
        """A write whose answer was lost (a server failed over) may have landed: if the stored
        checkpoint is ours and this one, adopt its revision."""
        try:
            entry = await self.kv.get(self.key(partition))
            snap = read_snapshot_bytes(entry.value or b"", None, self.key(partition))
        except (KeyNotFoundError, CheckpointError):
            return False
        extra = snap.extra or {}
        if extra.get("owner") == self.owner and extra.get("covers") == covers:
            self.revisions[partition] = entry.revision or 0
            return True
        return False

    def forget(self, partition: int) -> None:
        self.revisions.pop(partition, None)


def _ours(snap: Snapshot, partition: int, what: str) -> int:
    """Check and take out what a partition's checkpoint adds to `extra`; the sequence it covers.
    What is left is the table's bookkeeping (StreamTable.restore checks it)."""
    extra = dict(snap.extra or {})
    found, covers = extra.pop("partition", None), extra.pop("covers", None)
    extra.pop("owner", None)
    if found != partition:
        raise CheckpointError(f"{what} is of partition {found!r}; expected {partition}")
    if type(covers) is not int or covers < 0:
        raise CheckpointError(f"{what}: covers is {covers!r}; expected a stream sequence >= 0")
    snap.extra = extra
    return covers
