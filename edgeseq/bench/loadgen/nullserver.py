"""A server that speaks the daemon's line protocol over TCP and computes nothing.

For every chunk it receives it counts the complete lines and writes back as many canned answers,
in one sendall. Driven by the same load as the daemon, its rate is the load generator's own
ceiling: a daemon figure is credible only well below it.

Run as its own process, `python -m edgeseq.bench.loadgen.nullserver [--lifetime S]`; it logs the
daemon's `{"event": "listening", "port": ...}` and `{"event": "ready"}` on stderr.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time

HOST = "127.0.0.1"
ANSWER = b'{"id":"null","seq":0,"y":[0.0]}\n'
CHUNK = 1 << 20
LIFETIME = 3600.0  # seconds before the server exits by itself, whoever forgets to stop it


def answer(conn: socket.socket, deadline: float) -> None:
    """Answer one connection, line for line, until its client closes it (or the deadline)."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.settimeout(max(deadline - time.monotonic(), 0.001))
    with conn:
        try:
            while chunk := conn.recv(CHUNK):
                lines = chunk.count(b"\n")
                if lines:
                    conn.sendall(ANSWER * lines)
        except OSError:
            pass  # the client went away, or the lifetime ran out


def serve(lifetime: float = LIFETIME) -> None:
    deadline = time.monotonic() + lifetime
    with socket.create_server((HOST, 0)) as server:
        _log("listening", port=server.getsockname()[1], host=HOST)
        _log("ready")
        while (left := deadline - time.monotonic()) > 0:
            server.settimeout(min(left, 1.0))
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=answer, args=(conn, deadline), daemon=True).start()


def _log(event: str, **fields: object) -> None:
    sys.stderr.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stderr.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--lifetime", type=float, default=LIFETIME)
    serve(parser.parse_args().lifetime)


if __name__ == "__main__":
    main()
