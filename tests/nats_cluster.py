"""A real 3-node NATS JetStream cluster on 127.0.0.1 for the partitioned-daemon tests, started
by the tests themselves (edgeseq.bench.loadgen.nats_cluster does the work).

`nats_cluster` is session-scoped: one cluster for the run, each node with an MQTT listener.
Tests keep out of each other's way by serving streams and subjects of their own: `Tenant`
writes them into a config file's [nats] table, as a user would.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeseq.bench.loadgen.nats_cluster import NatsCluster
from edgeseq.errors import EdgeseqError

_numbers = itertools.count()


@pytest.fixture(scope="session", name="nats_cluster")
def nats_cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    cluster = NatsCluster(tmp_path_factory.mktemp("nats"), size=3, mqtt=True)
    try:
        cluster.start()
    except EdgeseqError as exc:
        cluster.stop()
        pytest.fail(f"the NATS tests need a real cluster: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@dataclass
class Tenant:
    """One test's stream, subjects and config file on the shared cluster."""

    stream: str
    subject_in: str  # with {id}
    subject_out: str  # with {id}
    config: Path

    @classmethod
    def make(
        cls,
        cluster: NatsCluster,
        folder: Path,
        tag: str,
        partitions: int = 16,
        subject_in: str | None = None,
        subject_out: str | None = None,
        extra: str = "",
    ) -> Tenant:
        name = f"{tag}{next(_numbers)}"
        subject_in = subject_in or f"{name}.in.{{id}}"
        subject_out = subject_out or f"{name}.out.{{id}}"
        config = folder / f"{name}.toml"
        config.write_text(
            "[nats]\n"
            f'servers = "{cluster.urls}"\n'
            f'stream = "{name.upper()}"\n'
            f'in = "{subject_in.replace("{id}", "*")}"\n'
            f'out = "{subject_out}"\n'
            f"partitions = {partitions}\n"
            'checkpoint_interval = "1s"\n' + extra,
            encoding="utf-8",
        )
        return cls(name.upper(), subject_in, subject_out, config)
