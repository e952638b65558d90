"""A real Mosquitto broker for the MQTT daemon tests, installed and started by the tests themselves.

`mqtt_broker` is a session-scoped pytest fixture: it finds `mosquitto` (installing Debian's package
with apt-get when it is missing: CI machines start fresh and run as root), starts it on a free
port of 127.0.0.1 with a config written to a temporary folder, waits until the port accepts
connections, yields (host, port) and stops the broker at the end of the session. A broker that
cannot be installed or started fails the tests, loudly: they must run in CI, never be skipped.

Import it into a test module to use it, then ask for `mqtt_broker` like any fixture:
`from tests.mqtt_broker import mqtt_broker_fixture  # noqa: F401`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HOST = "127.0.0.1"
CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/bin/mosquitto")
INSTALL = ["apt-get", "install", "-y", "--no-install-recommends", "mosquitto"]


def find_mosquitto() -> str | None:
    """The path of the mosquitto binary, or None (it lives in /usr/sbin, often not on PATH)."""
    found = shutil.which("mosquitto")
    if found is not None:
        return found
    return next((path for path in CANDIDATES if os.access(path, os.X_OK)), None)


def _apt(args: list[str]) -> tuple[bool, str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"$ {' '.join(args)}\n{exc}"
    output = (
        f"$ {' '.join(args)} (exit {done.returncode})\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    )
    return done.returncode == 0, output


def install_mosquitto() -> str:
    """Find mosquitto, installing Debian's package if needed; fails the test run if impossible."""
    found = find_mosquitto()
    if found is not None:
        return found
    if shutil.which("apt-get") is None:
        pytest.fail(
            "mosquitto is not installed and there is no apt-get to install it; the MQTT daemon "
            "tests need a real broker: install the `mosquitto` package",
            pytrace=False,
        )
    transcript = []
    ok, out = _apt(INSTALL)
    transcript.append(out)
    if not ok:  # a fresh machine may have no package lists yet
        ok, out = _apt(["apt-get", "update"])
        transcript.append(out)
        ok, out = _apt(INSTALL)
        transcript.append(out)
    found = find_mosquitto()
    if found is None:
        pytest.fail(
            "mosquitto is not installed and `apt-get install -y --no-install-recommends "
            "mosquitto` did not install it (the MQTT daemon tests need a real broker; CI runs "
            "them as root):\n" + "\n".join(transcript),
            pytrace=False,
        )
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def write_config(folder: Path, port: int) -> Path:
    conf = folder / "mosquitto.conf"
    conf.write_text(
        "\n".join(
            [
                f"listener {port} {HOST}",
                "allow_anonymous true",
                "persistence false",
                # a persistent session keeps everything published while its daemon is down
                "max_queued_messages 100000",
                "max_inflight_messages 0",  # no limit on QoS 1 messages awaiting their PUBACK
                "log_dest stderr",
                "log_type error",
                "log_type warning",
                "log_type notice",
                "",
            ]
        ),
        encoding="utf-8",
    )
    return conf


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_broker(
    binary: str, folder: Path, timeout: float = 15.0
) -> tuple[subprocess.Popen[bytes], int]:
    """Start mosquitto on a free port; retried when another process takes the port first."""
    log_path = folder / "mosquitto.log"
    for _attempt in range(3):
        port = free_port()
        conf = write_config(folder, port)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT, cwd=folder
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if _accepts(port):
                return proc, port
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
    log_text = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
    pytest.fail(
        f"mosquitto ({binary}) did not start listening on {HOST}:\n{log_text}", pytrace=False
    )


def stop_broker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="session", name="mqtt_broker")
def mqtt_broker_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """(host, port) of a Mosquitto broker running for the whole test session."""
    binary = install_mosquitto()
    proc, port = start_broker(binary, tmp_path_factory.mktemp("mosquitto"))
    try:
        yield HOST, port
    finally:
        stop_broker(proc)
