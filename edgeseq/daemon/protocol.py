"""The wire format (README.md, "Streaming daemon"): one JSON object per line in, one per line out.

In:  {"id": "pump-7", "seq": 42, "x": [0.4, 1.2, 0.0]}   (+ optional "reset", "start", "end": true)
     {"id": "pump-7", "seq": 42, "x": {"pressure": 0.4, "flow": 1.2, "temperature": 0.0}}
Out: {"id": "pump-7", "seq": 42, "y": [...]}
Bad: {"id": ..., "seq": ..., "error": {"code": "...", "message": "..."}}

Everything a client sends is checked here, before it can reach a stream: a message that fails
any check becomes a `BadMessage` with a stable `code`, and no state is touched. CSV lines
(`id,seq,x1,...,xn`) parse to the same `Sample`. `"start": true` (Triton's sequence start) says
the message begins its stream anew: the state starts from zero and the stream's seq numbering
starts over at this message's seq (a device that rebooted); `"reset": true` zeroes the state
within the same numbering.

The common message (id, seq and x, nothing else) takes a fast path of a few type checks; every
other message goes through the checks that name what is wrong. Nothing a client sends may
raise anything but BadMessage here: whatever else goes wrong becomes an `internal` refusal of
that one message.
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass
from typing import Any

from edgeseq.errors import ShapeError
from edgeseq.features import by_name

try:  # several times faster than the standard library on every message, both ways
    import orjson
except ImportError:  # pragma: no cover - the daemon extra installs it; json still works
    orjson = None  # type: ignore[assignment]

MAX_ID_CHARS = 256
FLOAT32_MAX = 3.4028234663852886e38
FIELDS = frozenset({"id", "seq", "x", "reset", "start", "end"})
NUMBERS = frozenset({float, int})  # the types of a valid "x" value as JSON decodes it


class Width(int):
    """A model's number of features, and their names, by which "x" may give a sample
    ({"pressure": 0.4, ...}). A plain int works wherever a Width does (no names then)."""

    names: tuple[str, ...] = ()

    def __new__(cls, names: tuple[str, ...]) -> Width:
        width = super().__new__(cls, len(names))
        width.names = tuple(names)
        return width


def width_of(n_features: int, names: tuple[str, ...]) -> int:
    """The width the parsers take: a Width when the model names every feature, else the count."""
    return Width(names) if names and len(names) == n_features else n_features


class BadMessage(Exception):
    """A message refused at the edge: `code` is stable (clients and metrics key on it)."""

    def __init__(self, code: str, message: str, stream_id: Any = None, seq: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.stream_id, self.seq = code, message, stream_id, seq


@dataclass(slots=True)
class Sample:
    """One validated message for one stream; `x` is None for a bare reset or end."""

    stream_id: str
    seq: int | None
    x: list[float] | None
    reset: bool = False
    end: bool = False
    start: bool = False  # a new sequence begins: zero state, and seq numbering starts over


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_id(value: object, seq: Any) -> str:
    if value is None:
        raise BadMessage("missing_id", 'the message has no "id"; expected a string', None, seq)
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS or not _utf8(value):
        raise BadMessage(
            "bad_id",
            f'"id" is {_brief(value)}; expected a non-empty UTF-8 string of at most '
            f"{MAX_ID_CHARS} characters",
            None,
            seq,
        )
    return value


def _utf8(text: str) -> bool:
    """False for text with a lone surrogate: JSON's \\ud800 escape decodes to one, and no
    answer naming it could be written as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_seq(value: object, sid: str) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value < 0:  # type: ignore[operator]
        raise BadMessage(
            "bad_seq", f'"seq" is {_brief(value)}; expected an integer >= 0', sid, None
        )
    return int(value)  # type: ignore[call-overload]


def _named(value: dict[Any, Any], n_features: int, sid: str, seq: int | None) -> list[Any]:
    """ "x" given by feature name: its values in the model's order, or a refusal naming what
    is missing or unknown, and what the model takes."""
    names = getattr(n_features, "names", ())
    if not names:
        raise BadMessage("bad_x", '"x" names its values, but this model has no feature names; '
                         f"expected a list of {n_features} numbers", sid, seq)  # fmt: skip
    try:
        return by_name(value, names, '"x"', show=_brief)
    except ShapeError as exc:
        raise BadMessage("wrong_features", str(exc), sid, seq) from None


def _check_x(value: object, n_features: int, sid: str, seq: int | None) -> list[float]:
    if n_features == 1 and isinstance(value, int | float) and not isinstance(value, bool):
        value = [value]  # a one-feature model takes a bare number too
    keys: list[Any] = list(range(n_features))  # how an error names a value: "x"[1], "x"["flow"]
    if isinstance(value, dict):
        value, keys = _named(value, n_features, sid, seq), list(getattr(n_features, "names", ()))
    if not isinstance(value, list):
        raise BadMessage(
            "bad_x", f'"x" is {_brief(value)}; expected a list of {n_features} numbers', sid, seq
        )
    if len(value) != n_features:
        raise BadMessage(
            "wrong_features",
            f'"x" has {len(value)} values; the model expects {n_features}',
            sid,
            seq,
        )
    for key, v in zip(keys, value, strict=True):
        i = json.dumps(key)
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise BadMessage("bad_x", f'"x"[{i}] is {_brief(v)}; expected a number', sid, seq)
        # float32 is what the model computes in: 1e39 is finite in JSON but not there, and an
        # integer of 400 digits is no float at all (float() would raise).
        if not _finite_float32(v):
            raise BadMessage(
                "not_finite",
                f'"x"[{i}] is {_brief(v)}; expected a finite float32 number (|x| <= 3.4e38)',
                sid,
                seq,
            )
    return [float(v) for v in value]


def _finite_float32(v: float) -> bool:
    if isinstance(v, int):
        return abs(v) <= FLOAT32_MAX
    return math.isfinite(v) and abs(v) <= FLOAT32_MAX


def _check_flag(message: dict[str, Any], name: str, sid: str, seq: int | None) -> bool:
    value = message.get(name, False)
    if not isinstance(value, bool):
        raise BadMessage(
            "bad_control", f'"{name}" is {_brief(value)}; expected true or false', sid, seq
        )
    return value


def sample_from_object(message: object, n_features: int) -> Sample:
    """Validate one decoded JSON message (also MQTT payloads)."""
    if not isinstance(message, dict):
        raise BadMessage("bad_json", f"the message is {_brief(message)}; expected a JSON object")
    raw_seq = message.get("seq")
    sid = _check_id(message.get("id"), raw_seq if _is_int(raw_seq) else None)
    seq = _check_seq(raw_seq, sid)
    unknown = sorted(set(message) - FIELDS)
    if unknown:
        raise BadMessage(
            "unknown_field",
            f"unknown field(s) {', '.join(map(repr, unknown))}; expected {sorted(FIELDS)}",
            sid,
            seq,
        )
    reset, end = _check_flag(message, "reset", sid, seq), _check_flag(message, "end", sid, seq)
    start = _check_flag(message, "start", sid, seq)
    if "x" not in message:
        if not (reset or end or start):
            raise BadMessage(
                "missing_x", 'the message has no "x" (and no "reset", "start" or "end")', sid, seq
            )
        return Sample(sid, seq, None, reset, end, start)
    return Sample(sid, seq, _check_x(message["x"], n_features, sid, seq), reset, end, start)


def parse_json(line: bytes, n_features: int, max_bytes: int) -> Sample:
    """One JSON line -> Sample, or BadMessage (`max_bytes` counts the line without its end)."""
    line = line.rstrip(b"\r\n")
    if len(line) > max_bytes:
        raise BadMessage("too_long", f"the line has {len(line)} bytes; the limit is {max_bytes}")
    try:
        message, checked_text = decode_fast(line, "line")
        return read_message(message, n_features, checked_text)
    except BadMessage:
        raise
    except Exception as exc:  # a defect: this message is refused, the connection serves on
        raise BadMessage("internal", f"the message could not be read: {_defect(exc)}") from None


def addressed_message(
    address_id: str, payload: bytes | bytearray, max_bytes: int
) -> tuple[Any, bool]:
    """A message whose address names its stream (an MQTT topic's "+", a NATS subject's last
    token), decoded: (message, whether orjson read it), for read_message; or BadMessage. A
    payload without "id" takes the address's; a payload whose "id" differs is refused
    (id_mismatch): its stream's samples would otherwise be split."""
    if len(payload) > max_bytes:
        raise BadMessage(
            "too_long", f"the payload has {len(payload)} bytes; the limit is {max_bytes}"
        )
    try:
        message, checked_text = decode_fast(payload, "payload")
    except BadMessage as bad:
        raise BadMessage(bad.code, bad.message, address_id) from None
    if isinstance(message, dict):
        message.setdefault("id", address_id)
        if message["id"] != address_id:
            seq = message.get("seq")
            raise BadMessage(
                "id_mismatch",
                f"the payload's id {_brief(message['id'])} differs from the address's "
                f"{_brief(address_id)}",
                address_id,
                seq if type(seq) is int and seq >= 0 else None,  # never a client's raw value
            )
    return message, checked_text


def read_message(message: Any, n_features: int, checked_text: bool) -> Sample:
    """A decoded message (a line's, an MQTT payload's) -> Sample, or BadMessage.
    `checked_text`: orjson decoded it, so its strings are valid UTF-8 (decode_fast)."""
    if checked_text and type(message) is dict and len(message) == 3:
        sample = _common(message, n_features)
        if sample is not None:
            return sample
    return sample_from_object(message, n_features)


_UNREAD = object()


def _fast_loads(line: bytes | bytearray) -> Any:
    """orjson's reading of the line, or _UNREAD when orjson refuses it (the standard library's
    then reads what it can: its strings may hold lone surrogates, so they take the full checks)."""
    if orjson is None:  # pragma: no cover - the daemon extra installs it
        return _UNREAD
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return _UNREAD


def _common(message: dict[str, Any], n_features: int) -> Sample | None:
    """The usual message, {"id", "seq", "x"} and valid, in a few checks; None for anything
    else (sample_from_object then says what is wrong). orjson's strings are valid UTF-8 and
    its floats finite, so what is left is types, lengths and float32's range."""
    sid, seq, x = message.get("id"), message.get("seq"), message.get("x")
    if (
        type(sid) is str
        and type(seq) is int
        and type(x) is list
        and 0 < len(sid) <= MAX_ID_CHARS
        and seq >= 0
        and len(x) == n_features
        and set(map(type, x)) <= NUMBERS
        and n_features
        and min(x) >= -FLOAT32_MAX
        and max(x) <= FLOAT32_MAX
    ):
        return Sample(sid, seq, x)
    return None


def _defect(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_brief(str(exc))}"


def decode_fast(data: bytes | bytearray, what: str) -> tuple[Any, bool]:
    """(decode(data), whether orjson read it): orjson first, without a second call for the
    common case; orjson's strings are valid UTF-8, the standard library's may hold a lone
    surrogate."""
    message = _fast_loads(data)
    return (decode(data, what), False) if message is _UNREAD else (message, True)


def decode(data: bytes | bytearray, what: str) -> Any:
    """JSON bytes -> object; BadMessage("bad_json") if they are not JSON. orjson first; what it
    refuses goes through the standard library, which also reads the NaN and Infinity literals
    that some encoders write, so that those are refused as not_finite, the real reason."""
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadMessage("bad_json", f"the {what} is not valid JSON: {_brief(str(exc))}") from None


def is_csv_header(line: bytes) -> bool:
    """`id,seq,...` as a first line names the columns; it is not a sample."""
    cells = line.strip().lower().split(b",")
    return len(cells) >= 2 and cells[0].strip() == b"id" and cells[1].strip() == b"seq"


def parse_csv(line: bytes, n_features: int, max_bytes: int) -> Sample:
    """One `id,seq,x1,...,xn` line -> Sample, or BadMessage (seq may be empty)."""
    line = line.rstrip(b"\r\n")
    if len(line) > max_bytes:
        raise BadMessage("too_long", f"the line has {len(line)} bytes; the limit is {max_bytes}")
    try:
        cells = line.decode("utf-8").strip().split(",")
    except UnicodeDecodeError:
        raise BadMessage("bad_csv", "the line is not UTF-8 text") from None
    sid = cells[0].strip() or None
    seq_text = cells[1].strip() if len(cells) > 1 else ""
    seq: Any = None
    if seq_text:
        try:
            seq = int(seq_text)
        except ValueError:
            seq = seq_text
    values: list[Any] = []
    for cell in cells[2:]:
        try:
            values.append(float(cell))
        except ValueError:
            values.append(cell.strip())
    return sample_from_object({"id": sid, "seq": seq, "x": values}, n_features)


def answer(sid: str, seq: int | None, y: list[float], **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"id": sid, "seq": seq, "y": y}
    out.update(extra)
    return out


def error(code: str, message: str, sid: Any = None, seq: Any = None) -> dict[str, Any]:
    return {"id": sid, "seq": seq, "error": {"code": code, "message": message}}


def encode(obj: dict[str, Any]) -> bytes:
    """One answer line (answers never hold NaN: the table refuses non-finite outputs)."""
    if orjson is not None:
        try:
            return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)
        except TypeError:  # text orjson will not write (a lone surrogate): json escapes it
            pass
    return json.dumps(obj, separators=(",", ":")).encode("ascii") + b"\n"


_SHORT = reprlib.Repr()  # keyword arguments only from Python 3.12
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 3, 4, 4
_SHORT.maxstring = _SHORT.maxlong = _SHORT.maxother = 40


SEPARATOR, NEWLINE_SEPARATOR = b'},{"id":', b'}\n{"id":'


def encode_many(answers: list[dict[str, Any]]) -> bytes:
    """Answer lines for a whole parcel in one call: `len(answers)` lines, each ending "\n".

    orjson writes the list at once and its object separators become newlines. That is exact:
    every answer begins with its "id", no nested object has one, and inside a string a quote is
    always escaped. It is also much faster than a call per answer: each call allocates a fresh
    output buffer, which costs a microsecond when a thousand results are kept (per batch)."""
    if not answers:
        return b""
    if orjson is not None:
        try:
            text = orjson.dumps(answers)
        except TypeError:  # text orjson will not write (a lone surrogate): one by one
            pass
        else:
            lines = text[1:-1].replace(SEPARATOR, NEWLINE_SEPARATOR) + b"\n"
            if lines.count(b"\n") == len(answers):
                return lines
    return b"".join(map(encode, answers))


def _brief(value: object) -> str:
    """A short, safe description of a client's value for an error message: JSON where it is
    plain, else a depth-limited repr (a value nested 1,000 deep must not recurse)."""
    if isinstance(value, int) and abs(value) > 10**30:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    if isinstance(value, list | dict) and (len(value) > 8 or _nested(value)):
        text = _SHORT.repr(value)
    else:
        try:
            text = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            text = _SHORT.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _nested(value: list[Any] | dict[str, Any]) -> bool:
    items = value.values() if isinstance(value, dict) else value
    return any(isinstance(item, list | dict) for item in items)
