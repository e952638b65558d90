"""Where everything lives on JetStream, and making sure it is there.

- Samples are published on `nats_in` (edgeseq.in.<id>). The samples' stream (EDGESEQ, replicated
  `nats_replicas` times) captures them and, by its own subject transform, stores each under
  EDGESEQ.part.<p>.<id>, p = partition(n, id): the server's deterministic hash of the stream id,
  so every sample of one stream lands in one partition, whoever published it and wherever.
- Bucket EDGESEQ-leases: who is alive (member.<daemon>) and who owns what (lease.<p>), every key
  expiring `lease_ttl` after its last write.
- Bucket EDGESEQ-checkpoints: ckpt.<p>, one partition's stream states and the stream sequence
  they cover.

The daemons create these on first use. A stream that exists with another partitioning is refused:
changing the partition count moves every stream to another partition, which needs their states
moved with them (docs/cluster.md: changing the partition count).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from nats.js.api import (
    KeyValueConfig,
    StorageType,
    StreamConfig,
    SubjectTransform,
)
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, BadRequestError, NotFoundError, ServiceUnavailableError

from edgeseq.daemon.options import DaemonConfig
from edgeseq.errors import EdgeseqError

log = logging.getLogger("edgeseq.daemon")
SETUP_PATIENCE = 60.0  # seconds to wait for a cluster still electing its leaders


@dataclass(frozen=True)
class Layout:
    stream: str
    subject_in: str  # one "*": the stream id
    subject_out: str  # "{id}" is the stream id
    partitions: int
    replicas: int
    retention: float  # seconds
    lease_ttl: float
    answers: str = "plain"  # "stream": answers stored in the answers' stream too

    @classmethod
    def of(cls, config: DaemonConfig) -> Layout:
        return cls(
            config.nats_stream,
            config.nats_in,
            config.nats_out,
            config.nats_partitions,
            config.nats_replicas,
            config.nats_retention,
            config.nats_lease_ttl,
            config.nats_answers,
        )

    @property
    def part_prefix(self) -> str:
        return f"{self.stream}.part."

    def part_subject(self, partition: int) -> str:
        return f"{self.part_prefix}{partition}.*"

    @property
    def transform(self) -> SubjectTransform:
        position = 1  # nats_in's one "*" is the first wildcard
        dest = (
            f"{self.part_prefix}{{{{partition({self.partitions},{position})}}}}"
            f".{{{{wildcard({position})}}}}"
        )
        return SubjectTransform(src=self.subject_in, dest=dest)

    @property
    def leases_bucket(self) -> str:
        return f"{self.stream}-leases"

    @property
    def answers_stream(self) -> str:
        return f"{self.stream}-ANSWERS"

    def answers_config(self) -> StreamConfig:
        """Every answer, deduplicated by its sample's sequence (a replay's answer is the
        same answer): for consumers that must not miss one while they are away."""
        return StreamConfig(
            name=self.answers_stream,
            subjects=[self.subject_out.replace("{id}", "*")],
            num_replicas=self.replicas,
            storage=StorageType.FILE,
            max_age=self.retention,
            duplicate_window=min(120.0, self.retention),
        )

    @property
    def checkpoints_bucket(self) -> str:
        return f"{self.stream}-checkpoints"

    def stream_config(self) -> StreamConfig:
        return StreamConfig(
            name=self.stream,
            subjects=[self.subject_in],
            subject_transform=self.transform,
            num_replicas=self.replicas,
            storage=StorageType.FILE,
            max_age=self.retention,
            duplicate_window=min(120.0, self.retention),  # Nats-Msg-Id: a publisher's retry
        )


def _transient(exc: Exception) -> bool:
    """A cluster still forming: its leader does not yet know enough peers to place replicas."""
    text = f"{getattr(exc, 'description', '')} {exc}".lower()
    return "no suitable peers" in text or "temporarily unavailable" in text


async def _patiently(what: str, make: Any) -> Any:
    """Run `make()` until the cluster can answer: a cluster just started, or one that lost a
    node, has no JetStream leader for a few seconds."""
    deadline = time.monotonic() + SETUP_PATIENCE
    while True:
        try:
            return await make()
        except (TimeoutError, ServiceUnavailableError, APIError) as exc:
            if isinstance(exc, APIError) and not _transient(exc):
                raise
            if time.monotonic() > deadline:
                raise EdgeseqError(
                    f"JetStream did not answer while creating {what}: {exc}"
                ) from None
            await asyncio.sleep(0.25)


async def ensure(js: JetStreamContext, layout: Layout, max_value: int) -> tuple[Any, Any]:
    """The samples' stream and both buckets, created if missing; (leases kv, checkpoints kv).
    A stream of another partitioning, or a leases bucket of another TTL, is refused."""
    await _patiently(f"stream {layout.stream}", lambda: _ensure_stream(js, layout))
    if layout.answers == "stream":
        await _patiently(f"stream {layout.answers_stream}", lambda: _ensure_answers(js, layout))
    leases = await _patiently(
        f"bucket {layout.leases_bucket}",
        lambda: _ensure_bucket(
            js,
            KeyValueConfig(
                bucket=layout.leases_bucket,
                history=1,
                ttl=layout.lease_ttl,
                replicas=layout.replicas,
                storage=StorageType.FILE,
            ),
        ),
    )
    checkpoints = await _patiently(
        f"bucket {layout.checkpoints_bucket}",
        lambda: _ensure_bucket(
            js,
            KeyValueConfig(
                bucket=layout.checkpoints_bucket,
                history=1,
                max_value_size=max_value,
                replicas=layout.replicas,
                storage=StorageType.FILE,
            ),
        ),
    )
    return leases, checkpoints


async def _ensure_stream(js: JetStreamContext, layout: Layout) -> None:
    wanted = layout.stream_config()
    try:
        info = await js.stream_info(layout.stream)
    except NotFoundError:
        try:
            await js.add_stream(wanted)
            log.info(
                "stream created",
                extra={
                    "stream": layout.stream,
                    "partitions": layout.partitions,
                    "replicas": layout.replicas,
                },
            )
            return
        except BadRequestError as exc:
            if _transient(exc):
                raise
            raise EdgeseqError(f"cannot create stream {layout.stream}: {exc.description}") from None
    have = info.config
    transform = have.subject_transform
    found = (transform.src, transform.dest) if transform is not None else None
    if found != (wanted.subject_transform.src, wanted.subject_transform.dest):  # type: ignore[union-attr]
        raise EdgeseqError(
            f"stream {layout.stream} exists with subjects {have.subjects} mapped by {found}; "
            f"this daemon partitions {layout.subject_in} into {layout.partitions} partitions "
            f"({wanted.subject_transform.dest}). Serve with the cluster's nats settings, or give "  # type: ignore[union-attr]
            "another nats_stream"
        )


async def _ensure_answers(js: JetStreamContext, layout: Layout) -> None:
    try:
        await js.stream_info(layout.answers_stream)
    except NotFoundError:
        try:
            await js.add_stream(layout.answers_config())
        except BadRequestError as exc:
            if _transient(exc):
                raise
            raise EdgeseqError(
                f"cannot create stream {layout.answers_stream}: {exc.description}"
            ) from None


async def _ensure_bucket(js: JetStreamContext, config: KeyValueConfig) -> Any:
    try:
        kv = await js.key_value(config.bucket)
    except (NotFoundError, BadRequestError):
        return await js.create_key_value(config)
    if config.ttl is not None:
        status = await kv.status()
        ttl = status.ttl
        if ttl is None or abs(ttl - config.ttl) > 1e-3:
            raise EdgeseqError(
                f"bucket {config.bucket} exists with a TTL of {ttl} s; this daemon's lease TTL "
                f"is {config.ttl} s: every daemon of a cluster must use the same nats_lease_ttl"
            )
    return kv
