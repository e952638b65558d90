"""A real Mosquitto broker on a free port of 127.0.0.1, and Mosquitto's own C clients.

`ensure_mosquitto` finds the binaries, installing Debian's packages with apt-get when they are
missing (CI machines and benchmark boxes start fresh and run as root); `start_broker` writes a
config to a folder, starts the broker and waits until its port accepts connections. The MQTT
daemon tests (tests/mqtt_broker.py) and `edgeseq loadtest` share them. Failures raise
EdgeseqError with the apt-get transcript or the broker's log: never silently skipped.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from edgeseq.errors import EdgeseqError

HOST = "127.0.0.1"
SBIN = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")  # mosquitto: often off PATH
CLIENTS = ("mosquitto_pub", "mosquitto_sub")
APT_TIMEOUT = 600.0


def find(binary: str) -> str | None:
    """The path of one of Mosquitto's binaries, or None."""
    found = shutil.which(binary)
    if found is not None:
        return found
    paths = (os.path.join(folder, binary) for folder in SBIN)
    return next((path for path in paths if os.access(path, os.X_OK)), None)


def find_mosquitto() -> str | None:
    """The path of the mosquitto broker, or None."""
    return find("mosquitto")


def _apt(args: list[str]) -> tuple[bool, str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"$ {' '.join(args)}\n{exc}"
    output = (
        f"$ {' '.join(args)} (exit {done.returncode})\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    )
    return done.returncode == 0, output


def ensure_mosquitto(clients: bool = True) -> str:
    """The broker's path, installing `mosquitto` (and `mosquitto-clients` when `clients`) with
    apt-get if needed; raises EdgeseqError when that is impossible."""
    wanted = ["mosquitto", *(CLIENTS if clients else ())]
    packages = ["mosquitto", *(["mosquitto-clients"] if clients else [])]
    if all(find(binary) for binary in wanted):
        return str(find_mosquitto())
    if shutil.which("apt-get") is None:
        raise EdgeseqError(
            f"{' and '.join(packages)} not installed and there is no apt-get to "
            "install them: the MQTT figures need a real Mosquitto broker"
        )
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    ok, out = _apt(install)
    transcript = [out]
    if not ok:  # a fresh machine may have no package lists yet
        transcript += [_apt(["apt-get", "update"])[1], _apt(install)[1]]
    missing = [binary for binary in wanted if find(binary) is None]
    if missing:
        raise EdgeseqError(
            f"{missing} still missing after `{' '.join(install)}` (run it as "
            "root):\n" + "\n".join(transcript)
        )
    return str(find_mosquitto())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def write_config(folder: Path, port: int) -> Path:
    conf = folder / "mosquitto.conf"
    lines = [
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
    ]
    conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return conf


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_broker(
    binary: str, folder: Path, timeout: float = 15.0, port: int | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """Start mosquitto on `port`, else on a free port (retried when another process takes the
    port first)."""
    log_path = folder / "mosquitto.log"
    asked = port
    for _attempt in range(1 if asked else 3):
        port = asked or free_port()
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
        stop_broker(proc)
    log_text = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
    raise EdgeseqError(f"mosquitto ({binary}) did not start listening on {HOST}:\n{log_text}")


def stop_broker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
