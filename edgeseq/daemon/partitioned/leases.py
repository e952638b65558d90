"""Who is alive and who owns which partition: compare-and-set leases in a JetStream KV bucket.

Why leases on KV and not JetStream's pinned consumers of priority groups (server 2.11+): a
pinned consumer gives one partition to one client, but it cannot hand the new owner the
partition's checkpoint revision nor fence the old owner's checkpoint writes, and the Python
client does not speak priority groups yet. KV gives both from one mechanism, on any 2.10+
server: every write names the revision it replaces, and the bucket's TTL expires a daemon that
stops writing.

The rules, which every daemon applies on its own every `ttl / 3` seconds:
- it writes member.<name> (alive) and renews each lease.<p> it holds, naming the revision it
  holds (a renewal that fails means another daemon took the partition: it lets go at once);
- the partitions it should own are those for which it ranks first among the live members by
  rendezvous hashing (hash(member, p)): balanced, and when a member joins or leaves, only the
  partitions that must move do;
- it lets go of partitions it should not own (final checkpoint, then delete the lease), and
  claims those it should own whose lease is free (create: only one claimant can win).

A daemon killed with -9 stops renewing: its member key and leases expire after `ttl`, the
survivors rank without it and claim its partitions. Nothing else is needed: no operator, no
coordinator, no clock compared between machines (the server expires keys by its own clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

log = logging.getLogger("edgeseq.daemon")
Handler = Callable[[int], Awaitable[None]]
MOVES_AT_ONCE = 8  # partitions claimed or let go concurrently


def rank(member: str, partition: int) -> bytes:
    return hashlib.blake2b(f"{member}/{partition}".encode(), digest_size=8).digest()


def owner_of(partition: int, members: list[str]) -> str:
    """The member that should own `partition` (rendezvous hashing)."""
    return max(members, key=lambda member: rank(member, partition))


class Leases:
    def __init__(
        self,
        kv: Any,
        name: str,
        partitions: int,
        ttl: float,
        gain: Handler,
        let_go: Handler,
        lost: Handler,
    ) -> None:
        self.kv, self.name, self.partitions, self.ttl = kv, name, partitions, ttl
        self.gain, self.let_go, self.lost = gain, let_go, lost
        self.held: dict[int, int] = {}  # partition -> revision of our lease
        self.members: list[str] = []
        self.beats = 0
        self.last_beat: float | None = None
        self.moving: dict[int, asyncio.Future[None]] = {}  # partitions being claimed or let go
        self.failures: list[Exception] = []  # the daemon reads (and clears) these
        self._slots = asyncio.Semaphore(MOVES_AT_ONCE)

    @property
    def every(self) -> float:
        return self.ttl / 3

    def _key(self, partition: int) -> str:
        return f"lease.{partition}"

    async def beat(self) -> None:
        """One round of the rules above. Renewals come first and never wait for a partition
        being handed over: those run as tasks of their own, a few at a time."""
        await self.kv.put(f"member.{self.name}", self.name.encode())
        await asyncio.gather(*(self._renew(p) for p in list(self.held)))
        self.members = await self._members()
        self.beats += 1
        self.last_beat = time.monotonic()
        if self.name not in self.members or self.beats < 2:
            return  # daemons started together see each other before claiming anything
        mine = {p for p in range(self.partitions) if owner_of(p, self.members) == self.name}
        for p in sorted(set(self.held) - mine - set(self.moving)):
            self._move(p, self._let_go(p))
        for p in sorted(mine - set(self.held) - set(self.moving)):
            self._move(p, self._claim(p))

    def _move(self, partition: int, work: Awaitable[None]) -> None:
        async def guarded() -> None:
            async with self._slots:
                try:
                    await work
                except Exception as exc:
                    self.failures.append(exc)
                    log.warning(
                        "partition move failed; retried next round",
                        extra={"partition": partition, "detail": f"{type(exc).__name__}: {exc}"},
                    )
                finally:
                    self.moving.pop(partition, None)

        self.moving[partition] = asyncio.ensure_future(guarded())

    async def settle(self) -> None:
        """Until no partition is moving."""
        while self.moving:
            await asyncio.wait(list(self.moving.values()))

    async def _members(self) -> list[str]:
        """The live members: a watch of member.* that ends at the current values (the
        client's keys() would read every lease too, and filters only by substring)."""
        watcher = await self.kv.watch("member.*", ignore_deletes=True, meta_only=True)
        members = []
        try:
            async for entry in watcher:
                if entry is None:  # the current values are all in
                    break
                members.append(entry.key[len("member.") :])
        finally:
            await watcher.stop()
        return sorted(set(members))

    async def _renew(self, partition: int) -> None:
        revision = self.held.get(partition)
        if revision is None:
            return
        try:
            self.held[partition] = await self.kv.update(
                self._key(partition), self.name.encode(), last=revision
            )
        except KeyWrongLastSequenceError:
            if await self._still_ours(partition):  # an earlier renewal landed unanswered
                return
            self.held.pop(partition, None)
            log.warning("partition lease lost to another daemon", extra={"partition": partition})
            await self.lost(partition)

    async def _still_ours(self, partition: int) -> bool:
        try:
            entry = await self.kv.get(self._key(partition))
        except KeyNotFoundError:
            return False
        if entry.value == self.name.encode() and entry.revision is not None:
            self.held[partition] = entry.revision
            return True
        return False

    async def _claim(self, partition: int) -> None:
        try:
            revision = await self.kv.create(self._key(partition), self.name.encode())
        except KeyWrongLastSequenceError:
            if not await self._still_ours(partition):
                return  # held by a daemon that has not let go yet: next round
            revision = self.held[partition]
        self.held[partition] = revision
        try:
            await self.gain(partition)
        except Exception:
            await self._let_go(partition, checkpoint=False)
            raise

    async def _let_go(self, partition: int, checkpoint: bool = True) -> None:
        if checkpoint:
            await self.let_go(partition)
        revision = self.held.pop(partition, None)
        if revision is not None:
            with contextlib.suppress(KeyWrongLastSequenceError):  # taken already
                await self.kv.delete(self._key(partition), last=revision)

    async def release_all(self) -> None:
        """On the way out: every partition checkpointed and its lease deleted, so that the
        survivors claim them at their next beat instead of after the TTL."""
        await self.settle()
        for p in sorted(self.held):
            await self._let_go(p)
        try:
            await self.kv.delete(f"member.{self.name}")
        except Exception as exc:  # leaving anyway: the key expires
            log.debug("member key not deleted", extra={"detail": str(exc)})
