"""A seeded generator of hostile wire lines for `edgeseq serve`, and the client side of a fuzz run.

The daemon reads bytes from anything on the network. Whatever a line holds (random bytes,
invalid UTF-8, 2 KB of `[[[[`, a 400-digit number, a lone surrogate, two messages glued
together, a line past --max-line-bytes), the contract is the same: one answer per non-blank
line, the connection lives, and no other stream notices. So the fuzzer interleaves a few
well-behaved streams (seq 0, 1, 2, ... and their own random samples, rendered in every legal
JSON spelling) with the garbage, and a `Ledger` checks every answer as it arrives: the count,
that each is JSON, and that each valid stream's predictions equal `Stream.feed` offline.

Everything is drawn from one `np.random.Generator` seeded by (seed, connection), so a failure
is replayed by its seed. Lines are built as bytes, never through a JSON encoder, so they can
hold what no encoder writes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tests.daemon_harness import DEFAULT_MODEL

N_FEATURES = 3  # export/pump-lstm.onnx
TOL = 1e-5  # max abs gap between a daemon's y and Stream.feed's
WHITESPACE = (b"", b" ", b"\t", b"\r", b"  ", b" \t")  # legal JSON whitespace, no b"\n"
BLANKS = (b"", b" ", b"\t", b"\r", b" \t \r", b"\x0b", b"\x0c ")  # bytes.strip() empties these
ZEROS = (b"0", b"-0", b"0.0", b"-0.0", b"0e0", b"-0E+00")
HUGE_NUMBERS = (
    b"1e400", b"-1e400", b"1" + b"0" * 400, b"-" + b"9" * 400, b"1e39", b"-1e39",
    b"3.4028236e38", b"1e-400", b"1.7976931348623157e309", b"NaN", b"Infinity",
    b"-Infinity", b"0x10", b"01", b".5", b"1.", b"+1", b"1e", b"--1", b"1_000", b"-0",
)  # fmt: skip
ODD_IDS = (
    b'""', b'" "', b'"\\ud800"', b'"\\udfff"', b'"a\\ud800b"', b'"\\udc00\\ud800"',
    b'"\\ud800\\udc00"', b'"\\u0000"', b'"\\n"', '"\u30dd\u30f3\u30d7"'.encode(),
    b"5", b"-1", b"1.5", b"true", b"false", b"null", b"[]", b"{}", b'["a"]', b'{"a": "b"}',
)  # fmt: skip
WRONG = {
    "seq": (b'"3"', b"3.0", b"3.5", b"true", b"false", b"-1", b"1e3", b"[]", b"{}", b"[3]",
            b"1" + b"0" * 30, b"null"),
    "x": (b'"1,2,3"', b'{"a": 1}', b"[[1, 2, 3]]", b"[1, 2]", b"[1, 2, 3, 4]", b"[]",
          b"[true, false, true]", b"[null, null, null]", b'["1", "2", "3"]', b"null", b"1",
          b"true", b"[1, 2, [3]]", b"[1, 2, {}]"),
    "flag": (b"1", b"0", b'"true"', b'"yes"', b"null", b"[]", b"{}", b"[true]", b"1.0"),
}  # fmt: skip
POISON_X = (b"[1, 2]", b"[1, 2, 3, 4]", b'"1,2,3"', b"[1, 2, null]", b'[1, 2, "3"]',
            b"[true, 0, 0]", b"[1e39, 0, 0]", b"[1e400, 0, 0]", b"[0, 1" + b"0" * 400 + b", 0]",
            b"[[1, 2, 3]]", b'{"0": 1, "1": 2, "2": 3}')  # fmt: skip
FLAGS = ("reset", "end", "start")


def answers_owed(line: bytes, limit: int) -> int:
    """The answers one line (the bytes between two b"\\n") earns: a line over the limit one
    (too_long), a blank one (Python's bytes.strip() leaves nothing) none, any other one."""
    return 1 if len(line) > limit or line.strip() else 0


@functools.cache
def _model(path: Path) -> Any:
    import edgeseq

    return edgeseq.load(path)


_FEEDING = threading.Lock()


def offline(xs: np.ndarray, model: Path = DEFAULT_MODEL) -> np.ndarray:
    """Stream.feed over one stream's samples, the model loaded once (generators of several
    connections call this from their own threads)."""
    with _FEEDING:
        return _model(model).stream().feed(xs)


@dataclass
class ValidStream:
    """A well-behaved stream among the garbage: what it was sent and must get back."""

    sid: str
    xs: np.ndarray  # (T, F) float32 samples
    ys: np.ndarray  # (T, n_out) what Stream.feed gives for them
    next_seq: int = 0
    script: list[tuple[int, bool]] = field(default_factory=list)  # (seq, duplicate) owed, in order
    stale_pokes: int = 0  # seqs sent below the last applied one: each owes a `stale` error
    poisons: int = 0  # refusable lines naming this stream: each owes an error, maybe unnamed
    got: int = 0  # entries of `script` answered so far
    stale_seen: int = 0
    errors_seen: int = 0

    @property
    def finished(self) -> bool:
        return self.next_seq == len(self.xs)

    def take(self, answer: dict[str, Any]) -> str | None:
        """Check one answer naming this stream; a complaint, or None."""
        if "error" in answer:
            self.errors_seen += 1
            self.stale_seen += answer["error"].get("code") == "stale"
            if self.errors_seen > self.poisons + self.stale_pokes:
                return f"{self.sid}: more errors than refusable lines sent: {answer}"
            return None
        if self.got >= len(self.script):
            return f"{self.sid}: an answer nothing asked for: {answer}"
        seq, duplicate = self.script[self.got]
        self.got += 1
        if answer.get("seq") != seq or bool(answer.get("duplicate")) != duplicate:
            return f"{self.sid}: expected seq {seq} (duplicate {duplicate}), got {answer}"
        gap = np.abs(np.asarray(answer.get("y"), np.float64) - self.ys[seq]).max()
        if not gap <= TOL:
            return f"{self.sid} seq {seq}: y off Stream.feed by {gap:.3g}: {answer}"
        return None

    def shortfall(self) -> str | None:
        """At the end: every owed answer came (errors may be unnamed, so at most counted)."""
        if self.got != len(self.script):
            return f"{self.sid}: {self.got} of {len(self.script)} sample answers"
        if self.stale_seen != self.stale_pokes:
            return f"{self.sid}: {self.stale_seen} stale errors for {self.stale_pokes} stale seqs"
        return None


class Ledger:
    """One connection's account: answers owed (filled in by the Fuzzer as it writes) and
    answers taken (by the reader, each checked at once, so a million need no memory)."""

    def __init__(self, seed: int, conn: int) -> None:
        self.seed, self.conn = seed, conn
        self.owed = 0  # by terminated lines
        self.owed_at_eof = 0  # by an unterminated last line
        self.lines = self.blank = 0
        self.sealed = threading.Event()  # every line is written: `owed` is final
        self.taken = 0
        self.codes: Counter[str] = Counter()
        self.streams: dict[str, ValidStream] = {}
        self.problems: list[str] = []

    def complain(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(f"[seed {self.seed} connection {self.conn}] {text}")

    def take(self, raw: bytes) -> None:
        self.taken += 1
        try:
            answer = json.loads(raw.decode("utf-8"))  # strict UTF-8 first, then JSON
        except ValueError as exc:
            self.complain(f"answer {self.taken} is not UTF-8 JSON ({exc}): {raw[:200]!r}")
            return
        if not isinstance(answer, dict) or "id" not in answer or "seq" not in answer:
            self.complain(f"answer {self.taken} is not an object with id and seq: {raw[:200]!r}")
            return
        error = answer.get("error")
        if error is not None:
            self.codes[_code(error, self)] += 1
        sid = answer["id"]
        stream = self.streams.get(sid) if isinstance(sid, str) else None
        if stream is not None and (complaint := stream.take(answer)) is not None:
            self.complain(complaint)

    def verdict(self) -> list[str]:
        """Every problem seen, plus the count and each valid stream's shortfall."""
        owed = self.owed + self.owed_at_eof
        if self.taken != owed:
            self.complain(f"{self.taken} answers to {owed} non-blank lines (of {self.lines})")
        for stream in self.streams.values():
            if (short := stream.shortfall()) is not None:
                self.complain(short)
        return self.problems


def _code(error: object, ledger: Ledger) -> str:
    """An error's code, complaining when its shape is not the contract's."""
    if not isinstance(error, dict) or not isinstance(error.get("code"), str):
        ledger.complain(f"an error without a string code: {error!r}")
        return "?"
    if not isinstance(error.get("message"), str):
        ledger.complain(f"an error without a string message: {error!r}")
    code = error["code"]
    if code == "resend" and not _is_int(error.get("resend_from")):
        ledger.complain(f"a resend error without an integer resend_from: {error!r}")
    return code


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Fuzzer:
    """The lines of one connection: garbage of every kind, blank lines, and `slots` valid
    streams woven in (a finished stream makes room for a new one, so streams begin all through
    the run). Every answer a line owes is entered in `ledger` before the line is handed out."""

    def __init__(self, seed: int, conn: int, limit: int, slots: int = 3) -> None:
        self.rng = np.random.default_rng([seed, conn])
        self.limit, self.conn = limit, conn
        self.ledger = Ledger(seed, conn)
        self.junk_ids = [f'"junk-{conn}-{k}"'.encode() for k in range(6)]
        self.slots = [self._new_stream() for _ in range(slots)]
        kinds: dict[Callable[[], bytes], int] = {
            self._random_bytes: 10, self._invalid_utf8: 6, self._bom: 3, self._nul: 4,
            self._carriage: 4, self._deep: 8, self._huge_number: 8, self._odd_id: 8,
            self._wrong_type: 10, self._unknown_field: 5, self._truncated: 6,
            self._concatenated: 5, self._long_line: 4, self._not_object: 4, self._long_blank: 1,
        }  # fmt: skip
        self.kinds = list(kinds)
        weights = np.array(list(kinds.values()), np.float64)
        self.weights = weights / weights.sum()

    # -- the stream of bytes --------------------------------------------------------------------

    def chunks(self, n_lines: int, unterminated_tail: bool = False) -> Iterator[bytes]:
        """`n_lines` lines cut into writes of random sizes (1 B to 64 KiB), so lines, CRLFs and
        UTF-8 sequences are split across TCP segments. With `unterminated_tail` the last line
        has no b"\\n": the daemon can only answer it at end of input."""
        pending = bytearray()
        target = self._chunk_size()
        for i in range(n_lines):
            body = self._body()
            last = unterminated_tail and i == n_lines - 1
            pending += self._emit(body, terminated=not last)
            while len(pending) >= target:
                yield bytes(pending[:target])
                del pending[:target]
                target = self._chunk_size()
        if pending:
            yield bytes(pending)

    def _chunk_size(self) -> int:
        return int(np.exp(self.rng.uniform(0.0, np.log(65_536.0))))

    def _emit(self, body: bytes, terminated: bool) -> bytes:
        end = self._terminator(body) if terminated else b""
        owed = answers_owed(body + end[:-1], self.limit)  # the line: up to its b"\n"
        ledger = self.ledger
        ledger.lines += 1
        ledger.blank += owed == 0
        if terminated:
            ledger.owed += owed
        else:
            ledger.owed_at_eof += owed
        return body + end

    def _terminator(self, body: bytes) -> bytes:
        if len(body) + 2 > self.limit - 64:  # near the limit: whether b"\r" counts is not asked
            return b"\n"
        return self._pick((b"\n",) * 16 + (b"\r\n",) * 3 + (b"\r\r\n",))

    def _body(self) -> bytes:
        roll = self.rng.random()
        if roll < 0.06:
            return self._pick(BLANKS) * int(self.rng.integers(1, 4))
        if roll < 0.46:
            return self._valid_line()
        return self.kinds[int(self.rng.choice(len(self.kinds), p=self.weights))]()

    # -- valid streams --------------------------------------------------------------------------

    def _new_stream(self) -> ValidStream:
        length = int(self.rng.integers(10, 300))
        xs = self.rng.normal(0.0, 1.0, (length, N_FEATURES)).astype(np.float32)
        xs[self.rng.random(xs.shape) < 0.03] = 0.0  # spelt as -0, 0e0, ... on the wire
        sid = f"valid-{self.conn}-{len(self.ledger.streams)}"
        stream = self.ledger.streams[sid] = ValidStream(sid, xs, offline(xs))
        return stream

    def _valid_line(self) -> bytes:
        k = int(self.rng.integers(len(self.slots)))
        stream, roll = self.slots[k], self.rng.random()
        if roll < 0.05 and stream.next_seq >= 1:
            return self._duplicate(stream)
        if roll < 0.09 and stream.next_seq >= 2:
            return self._stale(stream)
        if roll < 0.16:
            return self._poison(stream)
        line = self._advance(stream)
        if stream.finished:
            self.slots[k] = self._new_stream()
        return line

    def _advance(self, stream: ValidStream) -> bytes:
        """The stream's next sample (seq 0 perhaps with reset, the last perhaps with end)."""
        seq = stream.next_seq
        flags = {}
        if self.rng.random() < 0.05:
            flags[self._pick(("reset", "end"))] = b"false"
        if seq == 0 and self.rng.random() < 0.3:
            flags["reset"] = b"true"
        if seq == len(stream.xs) - 1 and self.rng.random() < 0.5:
            flags["end"] = b"true"
        stream.script.append((seq, False))
        stream.next_seq += 1
        body = self._render(stream.sid, seq, self._spell_x(stream.xs[seq]), flags)
        if self.rng.random() < 0.03:  # as long as a line may be
            body = self._pad(body, self.limit - int(self.rng.integers(0, 33)))
        return body

    def _duplicate(self, stream: ValidStream) -> bytes:
        """The last applied seq again, with other samples: answered from memory."""
        stream.script.append((stream.next_seq - 1, True))
        return self._render(stream.sid, stream.next_seq - 1, self._random_x(), {})

    def _stale(self, stream: ValidStream) -> bytes:
        stream.stale_pokes += 1
        seq = int(self.rng.integers(0, stream.next_seq - 1))
        return self._render(stream.sid, seq, self._random_x(), {})

    def _poison(self, stream: ValidStream) -> bytes:
        """The stream's next seq in a line that must be refused: it must change nothing."""
        stream.poisons += 1
        seq, roll = stream.next_seq, self.rng.random()
        if roll < 0.5:
            return self._render(stream.sid, seq, self._pick(POISON_X), {})
        if roll < 0.65:
            depth = int(self.rng.integers(300, 1900))
            return self._render(stream.sid, seq, b"[" * depth + b"]" * depth, {})
        whole = self._render(stream.sid, seq, self._spell_x(stream.xs[seq]), {})
        if roll < 0.85:
            return whole[: int(self.rng.integers(1, whole.rindex(b"}")))]  # never a whole object
        over = self.limit + 1 + int(self.rng.integers(0, 64))
        return self._pad(whole, over if roll < 0.95 else self.limit * 3)

    # -- spelling one message -------------------------------------------------------------------

    def _pick(self, options: Any) -> Any:
        return options[int(self.rng.integers(len(options)))]

    def _render(self, sid: str, seq: int, x: bytes, flags: dict[str, bytes]) -> bytes:
        """One message in a random legal JSON spelling: any key order, whitespace (CR too)
        around every token, now and then a \\u escape inside the id."""
        fields = [(b'"id"', self._spell_id(sid)), (b'"seq"', b"%d" % seq), (b'"x"', x)]
        fields += [(f'"{name}"'.encode(), value) for name, value in flags.items()]
        ws = self._ws
        parts = [ws() + k + ws() + b":" + ws() + v + ws() for k, v in self._shuffled(fields)]
        return ws() + b"{" + b",".join(parts) + b"}" + ws()

    def _ws(self) -> bytes:
        return b"" if self.rng.random() < 0.6 else self._pick(WHITESPACE)

    def _shuffled(self, items: list[Any]) -> list[Any]:
        return [items[i] for i in self.rng.permutation(len(items))]

    def _spell_id(self, sid: str) -> bytes:
        if self.rng.random() < 0.9:
            return f'"{sid}"'.encode()
        k = int(self.rng.integers(len(sid)))
        return f'"{sid[:k]}\\u{ord(sid[k]):04x}{sid[k + 1 :]}"'.encode()

    def _spell_x(self, x: np.ndarray) -> bytes:
        return b"[" + b",".join(self._ws() + self._number(float(v)) for v in x) + b"]"

    def _number(self, v: float) -> bytes:
        """A float32 value in one of several spellings that all parse back to it."""
        if v == 0.0:
            return self._pick(ZEROS)
        style = self._pick(("%r", "%.9g", "%.9e", "%.12E"))
        return (repr(v) if style == "%r" else style % v).encode()

    def _random_x(self) -> bytes:
        return self._spell_x(self.rng.normal(0.0, 1.0, N_FEATURES).astype(np.float32))

    def _pad(self, body: bytes, length: int) -> bytes:
        """`body` (trailing whitespace dropped) with spaces after its "{" up to `length` bytes."""
        body = body.rstrip()
        at = body.index(b"{") + 1
        return body[:at] + b" " * max(length - len(body), 0) + body[at:]

    # -- garbage --------------------------------------------------------------------------------

    def _junk(self, **fields: bytes) -> bytes:
        """A message of a junk stream (never a valid one's id), `fields` replacing or adding."""
        base = {"id": self._pick(self.junk_ids), "seq": b"%d" % self.rng.integers(0, 5)}
        base["x"] = self._random_x()
        for name in FLAGS:
            if self.rng.random() < 0.1:
                base[name] = self._pick((b"true", b"false"))
        base.update(fields)
        items = [(f'"{k}"'.encode(), v) for k, v in base.items()]
        return b"{" + b", ".join(k + b": " + v for k, v in self._shuffled(items)) + b"}"

    def _insert(self, body: bytes, what: bytes) -> bytes:
        at = int(self.rng.integers(0, len(body) + 1))
        return body[:at] + what + body[at:]

    def _random_bytes(self) -> bytes:
        return self.rng.bytes(int(self.rng.integers(1, 300))).replace(b"\n", b"?")

    def _invalid_utf8(self) -> bytes:
        bad = self._pick((b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82",
                          b"\x80", b"\xf5\x80\x80\x80", b"\xf0\x9f\x98"))  # fmt: skip
        roll = self.rng.random()
        if roll < 0.4:
            return self._junk(id=b'"junk' + bad + b'"')
        if roll < 0.7:
            return self._junk(**{"x" + bad.decode("latin-1"): b"1"})
        return self._insert(self._junk(), bad)

    def _bom(self) -> bytes:
        roll, bom = self.rng.random(), b"\xef\xbb\xbf"
        if roll < 0.6:
            return bom * int(self.rng.integers(1, 3)) + self._junk()
        if roll < 0.8:
            return self._insert(self._junk(), bom)
        return b"\xff\xfe" + self._junk().decode().encode("utf-16-le")

    def _nul(self) -> bytes:
        roll = self.rng.random()
        if roll < 0.4:
            return self._insert(self._junk(), b"\x00" * int(self.rng.integers(1, 4)))
        if roll < 0.7:
            return self._junk(id=b'"junk\\u0000"')
        return b"\x00" * int(self.rng.integers(1, 64))

    def _carriage(self) -> bytes:
        roll, junk = self.rng.random(), self._junk()
        if roll < 0.5:
            for _ in range(int(self.rng.integers(1, 4))):
                junk = self._insert(junk, b"\r")
            return junk
        if roll < 0.8:
            return junk + b"\r" + self._junk()  # a CR is no line break: one line, one answer
        return b"\r".join([b""] * int(self.rng.integers(2, 5))) + junk

    def _deep(self) -> bytes:
        shape = self._pick(("array", "object", "mixed", "open", "close"))
        deep = self.rng.random() < 0.03  # far past any line limit
        depth = int(self.rng.integers(3_000, 8_000) if deep else self.rng.integers(50, 650))
        if shape == "array":
            nest = b"[" * (3 * depth) + b"]" * (3 * depth)
        elif shape == "object":
            nest = b'{"a":' * depth + b"1" + b"}" * depth
        elif shape == "mixed":
            nest = b'[{"a":' * depth + b"[]" + b"}]" * depth
        else:
            nest = (b"[" if shape == "open" else b"]") * (3 * depth)
        where = self._pick(("line", "id", "seq", "x", "reset", "end", "start", "meta"))
        return nest if where == "line" else self._junk(**{where: nest})

    def _huge_number(self) -> bytes:
        number = self._pick(HUGE_NUMBERS)
        where = self._pick(("x", "x", "seq", "id", "line"))
        if where == "x":
            values = [b"1", b"2", b"3"]
            values[int(self.rng.integers(3))] = number
            return self._junk(x=b"[" + b", ".join(values) + b"]")
        return number if where == "line" else self._junk(**{where: number})

    def _odd_id(self) -> bytes:
        if self.rng.random() < 0.6:
            return self._junk(id=self._pick(ODD_IDS))
        n = self._pick((256, 257, int(self.rng.integers(257, 3000))))
        return self._junk(id=b'"' + b"i" * n + b'"')

    def _wrong_type(self) -> bytes:
        name = self._pick(("seq", "x", "reset", "end", "start"))
        return self._junk(**{name: self._pick(WRONG.get(name, WRONG["flag"]))})

    def _unknown_field(self) -> bytes:
        names = ("foo", "ID", "Seq", "X", "x ", "", "__proto__", "durable", "y", "error")
        name = self._pick(names)
        value = self._pick((b"1", b"null", b'"v"', b"[]", b"{}", b"true"))
        return self._junk(**{name: value})

    def _truncated(self) -> bytes:
        junk = self._junk()
        return junk[: int(self.rng.integers(1, len(junk) - 1))]

    def _concatenated(self) -> bytes:
        a, b = self._junk(), self._junk()
        if self.rng.random() < 0.2:
            return b"[" + a + b", " + b + b"]"
        return a + self._pick((b"", b" ", b",", b"\t", b"\r", b"\r\r")) + b

    def _long_line(self) -> bytes:
        length = self._pick((
            self.limit - int(self.rng.integers(0, 64)),
            self.limit + 1 + int(self.rng.integers(0, 64)),
            self.limit * int(self.rng.integers(2, 5)),
        ))  # fmt: skip
        roll = self.rng.random()
        if roll < 0.5:
            return self._pad(self._junk(), length)
        if roll < 0.8:
            text = self.rng.integers(32, 127, length, np.uint8).tobytes()
            return text.strip() or b"?"
        pad = b'"' + b"p" * max(length - 80, 1) + b'"'
        return self._junk(pad=pad)

    def _not_object(self) -> bytes:
        return self._pick((
            b"1", b'"str"', b"null", b"true", b"[]", b"[1, 2, 3]", b'""', b"{}", b"[{}]",
            b'[{"id": "junk", "seq": 0, "x": [1, 2, 3]}]', b"{", b"}", b"]", b":", b",", b'"',
            b"tru", b"nul", b"{}{}", b'{"id"}', b'{"id":}', b'{,}', b"\\", b"/* */ {}",
        ))  # fmt: skip

    def _long_blank(self) -> bytes:
        """Whitespace past the limit: too_long, so one answer though it is blank."""
        length = self._pick((self.limit + 1, self.limit + int(self.rng.integers(2, 64))))
        chars = b" \t\x0b\x0c"
        return bytes(chars[i] for i in self.rng.integers(0, len(chars), length))


# -- the client ---------------------------------------------------------------------------------


def converse(port: int, fuzzer: Fuzzer, n_lines: int, timeout: float, tail: bool = False) -> Ledger:
    """`n_lines` of `fuzzer` on one TCP connection: a writer thread sends them while a reader
    thread takes every answer (neither waits on the other, so full buffers cannot deadlock).
    Once every terminated line is answered, half-close and read on to the daemon's close:
    then only the unterminated last line (`tail`) may still be answered."""
    ledger = fuzzer.ledger
    deadline = time.monotonic() + timeout
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    reading = sock.dup()  # its own timeout, so the reader's cannot cut a write short
    with sock, reading:
        writer = _thread(_write, sock, fuzzer.chunks(n_lines, tail), ledger)
        reader = _thread(_read, reading, ledger, deadline)
        _await_answers(ledger, reader, deadline)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        writer.join(max(deadline - time.monotonic(), 1.0))
        reader.join(max(deadline - time.monotonic(), 1.0) + 5.0)
        if writer.is_alive() or reader.is_alive():
            busy = "writing" if writer.is_alive() else "reading"
            ledger.complain(f"still {busy} at the deadline")
    return ledger


PATIENCE = 20.0  # seconds without an answer, every line written, before a run gives up


def _await_answers(ledger: Ledger, reader: threading.Thread, deadline: float) -> None:
    """Until every terminated line is answered; complain if the reader ends (the daemon
    closed), the deadline passes, or no answer comes for PATIENCE s after the last write."""
    seen, quiet_since = -1, time.monotonic()
    while not (ledger.sealed.is_set() and ledger.taken >= ledger.owed):
        now = time.monotonic()
        if ledger.taken != seen or not ledger.sealed.is_set():
            seen, quiet_since = ledger.taken, now
        why = (
            "the daemon closed the connection" if not reader.is_alive()
            else "the deadline passed" if now > deadline
            else f"no answer for {PATIENCE:.0f} s" if now - quiet_since > PATIENCE
            else None
        )  # fmt: skip
        if why is not None:
            ledger.complain(f"{why}: {ledger.taken} answers, {ledger.owed} owed so far")
            return
        time.sleep(0.005)


def _thread(target: Callable[..., None], *args: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def _write(sock: socket.socket, chunks: Iterator[bytes], ledger: Ledger) -> None:
    try:
        for chunk in chunks:
            sock.sendall(chunk)
    except OSError as exc:
        ledger.complain(f"writing failed after {ledger.lines} lines: {exc!r}")
    finally:
        ledger.sealed.set()


def _read(sock: socket.socket, ledger: Ledger, deadline: float) -> None:
    """Take answers until the daemon closes; complain about a reset, a timeout or a close in
    the middle of an answer line."""
    rest = b""
    try:
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            data = sock.recv(1 << 16)
            if not data:
                break
            *lines, rest = (rest + data).split(b"\n")
            for line in lines:
                ledger.take(line)
    except TimeoutError:
        ledger.complain(f"the daemon did not close; {ledger.taken} answers by the deadline")
    except OSError as exc:
        ledger.complain(f"the connection failed after {ledger.taken} answers: {exc!r}")
    if rest:
        ledger.complain(f"the daemon closed in the middle of an answer: {rest[:200]!r}")


def stdin_ledger(fuzzer: Fuzzer, n_lines: int, path: Path, tail: bool = False) -> Ledger:
    """Write `n_lines` of `fuzzer` to `path` (the input of a stdin-mode daemon); the ledger
    that its stdout must then satisfy."""
    with path.open("wb") as f:
        for chunk in fuzzer.chunks(n_lines, tail):
            f.write(chunk)
    fuzzer.ledger.sealed.set()
    return fuzzer.ledger
