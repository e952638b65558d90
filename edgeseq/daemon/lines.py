"""Bytes in, whole lines out, in bulk: the one line splitter of every stream transport.

A chunk read from a socket or a pipe is split in one call; blank lines are dropped (they get no
answer), and a line longer than the limit is never held whole: its bytes are dropped as they
come and the line appears once, as TOO_LONG, where it stood, so that it still gets its one
(`too_long`) answer in order.
"""

from __future__ import annotations

from edgeseq.daemon.batcher import TOO_LONG


class LineSplitter:
    def __init__(self, limit: int) -> None:
        self.limit, self._buf, self._skipping = limit, b"", False

    def push(self, chunk: bytes) -> list[bytes | None]:
        """The complete non-blank lines so far (TOO_LONG for each over-long one)."""
        lines = (self._buf + chunk if self._buf else chunk).split(b"\n")
        self._buf = lines.pop()
        if self._skipping and lines:
            self._skipping = False  # the tail of a line already reported
            lines.pop(0)
        limit = self.limit
        if lines and max(map(len, lines)) > limit:
            kept: list[bytes | None] = [TOO_LONG if _over(line, limit) else line for line in lines]
            kept = [line for line in kept if line is TOO_LONG or line.strip()]
        else:
            kept = [line for line in lines if line.strip()]
        if len(self._buf) > limit + 1:  # + the CR of a CRLF ending still to come
            if not self._skipping:
                kept.append(TOO_LONG)
            self._skipping, self._buf = True, b""
        return kept

    def finish(self) -> list[bytes | None]:
        """The last line, if the input ended without a newline."""
        rest, self._buf = self._buf, b""
        return [rest] if rest.strip() and not self._skipping else []


def _over(line: bytes, limit: int) -> bool:
    """Longer than `limit` without its line ending (a CRLF's CR is the ending's, as the
    parsers strip it)."""
    return len(line) - line.endswith(b"\r") > limit
