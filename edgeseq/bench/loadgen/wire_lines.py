"""JSON lines for the daemon, encoded before the clock starts; answers counted, never parsed.

A tick is one sample for each of a connection's streams, every line carrying the tick number as
its seq. Its block is built from pieces encoded once, joined by the seq's digits: one bytes.join
per tick (microseconds for hundreds of streams) and no JSON while the clock runs. Answers are
counted by their newlines, and error answers by the bytes `"error"`, on whole received chunks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PATTERNS = 16  # distinct x vectors per stream, cycled by tick
ERROR_MARK = b'"error"'
SAMPLE_BYTES = 300  # longest excerpt of an error answer kept for the report


def stream_ids(prefix: str, count: int) -> list[str]:
    """`count` stream ids, `prefix-00000` onwards."""
    return [f"{prefix}-{i:05d}" for i in range(count)]


def encode_line(sid: str, seq: int, x: Sequence[float]) -> bytes:
    """One sample as the daemon reads it: `{"id":..,"seq":..,"x":[..]}` and a newline."""
    return json.dumps({"id": sid, "seq": seq, "x": list(x)}, separators=(",", ":")).encode() + b"\n"


def samples(count: int, n_features: int, seed: int) -> np.ndarray:
    """(count, n_features) plausible sensor values, rounded so that lines stay short."""
    return np.random.default_rng(seed).normal(size=(count, n_features)).round(4)


class TickBlocks:
    """The lines of one tick for a fixed list of streams, seq patched in by a join."""

    def __init__(self, ids: Sequence[str], n_features: int, seed: int = 0) -> None:
        xs = samples(PATTERNS * len(ids), n_features, seed).reshape(PATTERNS, len(ids), -1)
        self.per_tick = len(ids)
        self._parts = [self._pieces(ids, xs[p]) for p in range(PATTERNS)]

    @staticmethod
    def _pieces(ids: Sequence[str], xs: np.ndarray) -> list[bytes]:
        """[head0, tail0 + head1, ..., tail_last]: joined by a seq, the lines of one tick."""
        lines = [encode_line(sid, 0, x.tolist()) for sid, x in zip(ids, xs, strict=True)]
        split = [line.split(b'"seq":0', 1) for line in lines]
        heads = [head + b'"seq":' for head, _ in split]
        tails = [tail for _, tail in split]
        return [heads[0], *(t + h for t, h in zip(tails, heads[1:], strict=False)), tails[-1]]

    def block(self, tick: int) -> bytes:
        """Every stream's line for `tick` (its seq), one bytes object."""
        return str(tick).encode().join(self._parts[tick % PATTERNS])


class LineCounter:
    """Newlines and `"error"` marks in a byte stream fed chunk by chunk (a mark split by a chunk
    boundary is still found once), and the line of the first mark, for the report."""

    def __init__(self, mark: bytes = ERROR_MARK) -> None:
        self.mark, self.lines, self.marks = mark, 0, 0
        self._tail = b""  # the last len(mark) - 1 bytes seen
        self._recent = b""  # the last SAMPLE_BYTES bytes, until the first mark
        self._excerpt: bytes | None = None  # the first mark's line, while it is being read
        self._complete = False

    def feed(self, chunk: bytes) -> None:
        self.lines += chunk.count(b"\n")
        edge = len(self.mark) - 1
        seam = self._tail + chunk[:edge]  # a mark here must straddle the boundary
        found = chunk.count(self.mark) + seam.count(self.mark)
        if self._excerpt is not None and not self._complete:
            self._extend(chunk)
        elif found and self._excerpt is None:
            self._begin(self._recent + chunk)
        if self._excerpt is None:
            self._recent = (self._recent + chunk[-SAMPLE_BYTES:])[-SAMPLE_BYTES:]
        self.marks += found
        self._tail = (self._tail + chunk)[-edge:] if len(chunk) < edge else chunk[-edge:]

    def _begin(self, data: bytes) -> None:
        at = data.find(self.mark)
        start = data.rfind(b"\n", 0, at) + 1
        self._excerpt = b""
        self._extend(data[start:])

    def _extend(self, chunk: bytes) -> None:
        assert self._excerpt is not None
        end = chunk.find(b"\n")
        self._excerpt = (self._excerpt + chunk[: end if end >= 0 else len(chunk)])[:SAMPLE_BYTES]
        self._complete = end >= 0 or len(self._excerpt) >= SAMPLE_BYTES

    @property
    def first_mark(self) -> str | None:
        """The line (its first SAMPLE_BYTES) of the first mark, None without any."""
        return None if self._excerpt is None else self._excerpt.decode("utf-8", "replace")


def n_features(model: Path) -> int:
    """From the graph's input, without loading the runtime here (see the package's docstring)."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value)
