"""A real Mosquitto broker for the MQTT daemon tests, installed and started by the tests themselves.

`mqtt_broker` is a session-scoped pytest fixture: it finds `mosquitto` (installing Debian's package
with apt-get when it is missing: CI machines start fresh and run as root), starts it on a free
port of 127.0.0.1 with a config written to a temporary folder, waits until the port accepts
connections, yields (host, port) and stops the broker at the end of the session. A broker that
cannot be installed or started fails the tests, loudly: they must run in CI, never be skipped.
The work is edgeseq.bench.loadgen.broker's, shared with `edgeseq loadtest`.

Import it into a test module to use it, then ask for `mqtt_broker` like any fixture:
`from tests.mqtt_broker import mqtt_broker_fixture  # noqa: F401`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from edgeseq.bench.loadgen.broker import HOST, ensure_mosquitto, start_broker, stop_broker
from edgeseq.errors import EdgeseqError


@pytest.fixture(scope="session", name="mqtt_broker")
def mqtt_broker_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """(host, port) of a Mosquitto broker running for the whole test session."""
    try:
        binary = ensure_mosquitto(clients=False)
        proc, port = start_broker(binary, tmp_path_factory.mktemp("mosquitto"))
    except EdgeseqError as exc:
        pytest.fail(f"the MQTT tests need a real broker: {exc}", pytrace=False)
    try:
        yield HOST, port
    finally:
        stop_broker(proc)
