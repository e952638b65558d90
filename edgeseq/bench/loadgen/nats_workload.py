"""NATS load: samples published into JetStream as sensors would, answers collected as a dashboard
would, each in its own process when measured (`python -m edgeseq.bench.loadgen.nats_workload`).

The publisher sends stream i's sample t as `{"id", "seq": t, "x"}` on `edgeseq.in.<id>`, every
stream's sample t before any stream's t+1, with JetStream publish acknowledgements (a window of
them in flight) and `Nats-Msg-Id: <id>:<seq>`, so a publish retried after a lost acknowledgement
is stored once. The collector subscribes to `edgeseq.out.>` and keeps every answer it gets,
duplicates included, as raw bytes: parsed after the clock stops. `expected_x` rebuilds any
sample's x, so an offline Stream.feed can check each answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeseq.bench.loadgen.wire_lines import PATTERNS, samples, stream_ids

WINDOW = 4_096  # publishes awaiting their acknowledgement
RETRIES = 20


async def _quiet(exc: Exception) -> None:
    """A node killed on purpose: the client reconnects to another; no traceback on stderr."""


CHUNK = 1_000  # plain publishes between two acknowledged ones (preload)


def sample_table(count: int, n_features: int, seed: int) -> np.ndarray:
    """(PATTERNS, count, n_features): stream i's sample t is [t % PATTERNS, i]."""
    return samples(PATTERNS * count, n_features, seed).reshape(PATTERNS, count, n_features)


def expected_x(table: np.ndarray, stream: int, seq: int) -> np.ndarray:
    return table[seq % PATTERNS, stream]


def payloads(ids: Sequence[str], table: np.ndarray, seq: int) -> list[bytes]:
    return [
        json.dumps(
            {"id": sid, "seq": seq, "x": table[seq % PATTERNS, i].tolist()}, separators=(",", ":")
        ).encode()
        for i, sid in enumerate(ids)
    ]


async def publish(
    servers: list[str],
    ids: Sequence[str],
    per_stream: int,
    table: np.ndarray,
    subject: str = "edgeseq.in.{id}",
    first_seq: int = 0,
    acked: bool = True,
) -> float:
    """Publish seq first_seq..first_seq+per_stream-1 of every stream; seconds taken. `acked`:
    every publish is acknowledged by the stream, retried until it is (a node may die
    meanwhile). Otherwise plain publishes, as fast as the client goes, each CHUNK closed by one
    acknowledged publish so that JetStream's inbound queue never overflows (it drops what does
    not fit): a preload into a healthy cluster; `stored` tells whether every one is in."""
    import nats

    nc = await nats.connect(
        servers=servers,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        pending_size=64 << 20,
        error_cb=_quiet,
    )
    js = nc.jetstream(timeout=10.0, publish_async_max_pending=WINDOW)
    started = time.perf_counter()
    try:
        for seq in range(first_seq, first_seq + per_stream):
            bodies = payloads(ids, table, seq)
            if acked:
                await _publish_round(js, ids, bodies, seq, subject)
                continue
            for start in range(0, len(ids), CHUNK):
                chunk = list(
                    zip(ids[start : start + CHUNK], bodies[start : start + CHUNK], strict=True)
                )
                for sid, body in chunk[:-1]:
                    await nc.publish(
                        subject.replace("{id}", sid), body, headers={"Nats-Msg-Id": f"{sid}:{seq}"}
                    )
                sid, body = chunk[-1]  # acknowledged: the chunk before it is in (one connection)
                await js.publish(
                    subject.replace("{id}", sid), body, headers={"Nats-Msg-Id": f"{sid}:{seq}"}
                )
        await js.publish_async_completed()
        await nc.flush(timeout=60)
    finally:
        await nc.drain()
    return time.perf_counter() - started


async def stored(servers: list[str], stream: str = "EDGESEQ") -> int:
    """How many messages the samples' stream holds."""
    import nats

    nc = await nats.connect(servers=servers, error_cb=_quiet)
    try:
        info = await nc.jetstream(timeout=10.0).stream_info(stream)
        return int(info.state.messages)
    finally:
        await nc.close()


async def _publish_round(
    js: Any, ids: Sequence[str], bodies: list[bytes], seq: int, subject: str
) -> None:
    todo = list(range(len(ids)))
    for _attempt in range(RETRIES):
        futures = []
        for i in todo:
            headers = {"Nats-Msg-Id": f"{ids[i]}:{seq}"}
            try:
                future = await js.publish_async(
                    subject.replace("{id}", ids[i]), bodies[i], headers=headers, wait_stall=30.0
                )
            except Exception:  # no connection just now: this one is retried
                futures.append((i, None))
                continue
            futures.append((i, future))
        failed = []
        for i, future in futures:
            try:
                if future is None:
                    raise ConnectionError
                await future
            except Exception:
                failed.append(i)
        if not failed:
            return
        todo = failed
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{len(todo)} samples of seq {seq} not acknowledged after {RETRIES} tries")


class Collector:
    """Every answer on `edgeseq.out.>` (raw), until `expected` distinct (id, seq) are in."""

    def __init__(self, servers: list[str], subject: str = "edgeseq.out.>",
                 stream: str | None = None) -> None:  # fmt: skip
        """`stream`: read the answers' stream (an ordered consumer) instead of subscribing:
        nothing is missed while this collector's own server is down."""
        self.servers, self.subject, self.stream = servers, subject, stream
        self.raw: list[bytes] = []
        self.first: float | None = None
        self.last: float | None = None
        self.nc: Any = None

    async def start(self) -> None:
        import nats

        self.nc = await nats.connect(
            servers=self.servers,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
            error_cb=_quiet,
        )

        async def keep(msg: Any) -> None:
            now = time.perf_counter()
            if self.first is None:
                self.first = now
            self.last = now
            self.raw.append(msg.data)

        if self.stream is not None:
            await self.nc.jetstream(timeout=10.0).subscribe(
                self.subject, stream=self.stream, cb=keep, ordered_consumer=True,
                pending_msgs_limit=-1, pending_bytes_limit=-1,
            )  # fmt: skip
        else:
            await self.nc.subscribe(
                self.subject, cb=keep, pending_msgs_limit=-1, pending_bytes_limit=-1
            )

        await self.nc.flush()

    async def wait(
        self, expected: int, timeout: float, quiet: float = 2.0, progress: bool = False
    ) -> None:
        """Until `expected` answers are in and `quiet` seconds pass without more, or timeout.
        `progress`: print {"answers": n} on stdout every half second."""
        deadline = time.monotonic() + timeout
        said = time.monotonic()
        while time.monotonic() < deadline:
            if progress and time.monotonic() - said >= 0.5:
                said = time.monotonic()
                sys.stdout.write(json.dumps({"answers": len(self.raw)}) + "\n")
                sys.stdout.flush()
            if (
                len(self.raw) >= expected
                and self.last is not None
                and time.perf_counter() - self.last > quiet
            ):
                return
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.nc is not None:
            await self.nc.close()


def answers_by_key(raw: list[bytes]) -> tuple[dict[tuple[str, int], list[Any]], list[Any]]:
    """((id, seq) -> every answer given to it, in order; answers that carry an error)."""
    by_key: dict[tuple[str, int], list[Any]] = {}
    errors: list[Any] = []
    for body in raw:
        answer = json.loads(body)
        if "error" in answer:
            errors.append(answer)
            continue
        by_key.setdefault((answer["id"], answer["seq"]), []).append(answer)
    return by_key, errors


def main(argv: list[str] | None = None) -> int:
    """The publisher as its own process: prints {"seconds": ..} when every sample is stored."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("servers")
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--features", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-seq", type=int, default=0)
    parser.add_argument("--prefix", default="s")
    parser.add_argument("--subject", default="edgeseq.in.{id}")
    parser.add_argument("--preload", action="store_true", help="plain publishes, then a count")
    parser.add_argument("--stream", default=None, help="the samples' stream (for --preload)")
    args = parser.parse_args(argv)
    if args.stream is None:
        args.stream = args.subject.split(".")[0].upper()
    ids = stream_ids(args.prefix, args.streams)
    table = sample_table(args.streams, args.features, args.seed)
    servers = args.servers.split(",")
    seconds = asyncio.run(publish(servers, ids, args.samples, table, args.subject,
                                  args.first_seq, acked=not args.preload))  # fmt: skip
    if args.preload:  # every sample must be in before the clock of a drain starts
        wanted = args.streams * args.samples
        deadline = time.monotonic() + 120
        while (found := asyncio.run(stored(servers, args.stream))) < wanted:
            if time.monotonic() > deadline:
                raise SystemExit(f"the stream holds {found:,} of {wanted:,} samples")
            time.sleep(0.25)

    sys.stdout.write(
        json.dumps({"seconds": seconds, "samples": args.streams * args.samples}) + "\n"
    )
    return 0


def collect_main(argv: list[str] | None = None) -> int:
    """The collector as its own process: writes every answer (a JSON line each) to OUT."""
    parser = argparse.ArgumentParser()
    parser.add_argument("servers")
    parser.add_argument("out", type=Path)
    parser.add_argument("--expected", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--subject", default="edgeseq.out.>")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--stream", default=None, help="read the answers' stream")
    parser.add_argument("--quiet", type=float, default=2.0, help="seconds without answers to end")
    args = parser.parse_args(argv)

    async def run() -> Collector:
        collector = Collector(args.servers.split(","), args.subject, args.stream)
        await collector.start()
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await collector.wait(args.expected, args.timeout, args.quiet, progress=args.progress)
        await collector.stop()
        return collector

    collector = asyncio.run(run())
    with open(args.out, "wb") as fh:
        for body in collector.raw:
            fh.write(body.rstrip(b"\n") + b"\n")
    span = (collector.last or 0) - (collector.first or 0)
    done = {"answers": len(collector.raw), "span": span, "cpu": time.process_time(), "done": True}
    sys.stdout.write(json.dumps(done) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(collect_main(sys.argv[2:]) if sys.argv[1:2] == ["collect"] else main())
