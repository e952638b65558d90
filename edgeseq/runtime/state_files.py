"""State snapshots: many streams' states in one pickle-free file, written atomically, read safely.

A snapshot is one uncompressed npz: `header` (UTF-8 JSON as uint8: format, version, the model's
fingerprint, the stream ids in order, the state keys and shapes, when, `extra`) and one float32
array per state key stacked over streams, (n_streams, H): 10,000 streams are a few arrays, not
10,000 entries. Arrays are named state0, state1, ... in header order, because state keys are ONNX
node names such as "/model/rnn/LSTM.h", which make poor zip member names.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np

from edgeseq.errors import CheckpointError, EdgeseqError
from edgeseq.runtime.engines import StateDict
from edgeseq.runtime.stream import StreamPool

FORMAT, VERSION = "edgeseq.state", 1
MAX_HEADER_BYTES = 64 << 20  # ids and `extra` of a very large fleet; more is not a snapshot
MAX_WIDTH = 1 << 20  # floats per stream per state key
NPY_PREAMBLE = 1 << 16  # room for an .npy member's own header in front of its data
NPY_HEADERS = {  # .npy version -> header reader; 3.0 (UTF-8 dtype names) is never ours
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
States = dict[str, StateDict]  # stream id -> that stream's state
Extra = dict[str, Any] | None


@dataclass
class Snapshot:
    """A validated snapshot: every state finite float32 of its declared shape."""

    fingerprint: str  # sha256 hex of the model file the states belong to
    ids: list[str]
    states: States  # id -> {key: (H,) float32}: rows of one array per key
    extra: Extra
    created: str  # ISO 8601, UTC


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _stack(states: States, ids: list[str]) -> dict[str, np.ndarray]:
    """One (n_streams, H) array per key; refuses what load_snapshot would refuse, so that every
    snapshot written can be read back."""
    keys = list(states[ids[0]]) if ids else []
    for sid in ids:
        if not isinstance(sid, str) or set(states[sid]) != set(keys):
            raise CheckpointError(
                f"stream {sid!r} has state keys {sorted(states[sid])}; expected a string id "
                f"with the keys of stream {ids[0]!r}: {sorted(keys)}"
            )
    stacked = {}
    for key in keys:
        try:
            block = np.stack([np.asarray(states[sid][key], np.float32) for sid in ids])
        except ValueError:
            raise CheckpointError(f"state {key!r} differs in shape between streams") from None
        if block.ndim != 2 or not 1 <= block.shape[1] <= MAX_WIDTH:
            raise CheckpointError(f"state {key!r} has shape {block.shape[1:]}; expected (H,)")
        if not np.isfinite(block).all():
            row = int(np.argwhere(~np.isfinite(block))[0, 0])
            raise CheckpointError(f"state {key!r} of stream {ids[row]!r} holds NaN or infinity")
        stacked[key] = block
    return stacked


def _write_npz(fh: IO[bytes], arrays: dict[str, np.ndarray]) -> None:
    """What np.savez writes (uncompressed npz), refusing pickles on every NumPy we support:
    savez takes `allow_pickle` only from NumPy 2.2 and before that would store it as an array."""
    with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, arr, allow_pickle=False)


def _write_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Temp file beside `path`, fsync, rename, fsync the directory (which holds the rename):
    whenever a crash comes, `path` is the previous snapshot or the new one, never a torn file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            _write_npz(fh, arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def snapshot_arrays(fingerprint: str, states: States, extra: Extra = None) -> dict[str, Any]:
    """The npz members of a snapshot of `states` (stream id -> state dict) of the model
    `fingerprint`; `extra` is the caller's JSON (a daemon's per-stream seq numbers, say).
    Refuses (CheckpointError) what load_snapshot would refuse, so every snapshot written can be
    read back."""
    ids = list(states)
    if not isinstance(fingerprint, str) or not fingerprint:
        raise CheckpointError(f"fingerprint is {fingerprint!r}; expected the model's sha256 hex")
    stacked = _stack(states, ids)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint,
        "ids": ids,
        "states": [{"key": key, "shape": list(arr.shape)} for key, arr in stacked.items()],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "extra": extra,
    }
    try:
        text = json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"snapshot extra {_brief(extra)} is not plain JSON: {exc}") from None
    encoded = text.encode("utf-8")
    if len(encoded) > MAX_HEADER_BYTES:  # load_snapshot would refuse it: keep the last good one
        raise CheckpointError(
            f"snapshot header of {len(ids):,} streams is {len(encoded):,} bytes (ids and extra); "
            f"a snapshot holds at most {MAX_HEADER_BYTES:,}"
        )
    arrays = {"header": np.frombuffer(encoded, np.uint8)}
    arrays.update({f"state{i}": arr for i, arr in enumerate(stacked.values())})
    return arrays


def save_snapshot(path: str | Path, fingerprint: str, states: States, extra: Extra = None) -> None:
    """Write `states` (stream id -> state dict) of the model `fingerprint` to `path` atomically;
    `extra` is the caller's JSON (a daemon's per-stream seq numbers, say)."""
    path = Path(path)
    try:
        arrays = snapshot_arrays(fingerprint, states, extra)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}: {path} not written") from None
    try:
        _write_atomically(path, arrays)
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from None


def snapshot_bytes(fingerprint: str, states: States, extra: Extra = None) -> bytes:
    """The same snapshot as save_snapshot writes, as bytes (a value in a key-value store)."""
    buffer = io.BytesIO()
    _write_npz(buffer, snapshot_arrays(fingerprint, states, extra))
    return buffer.getvalue()


def _read(npz: Any, name: str, dtype: type, shape: tuple[int, ...] | None, limit: int) -> Any:
    """One .npy member. Its size, dtype and shape are checked before its data is read, so a
    hostile file can make us neither allocate much nor unpickle anything; shape None: any 1-D."""
    try:
        info = npz.zip.getinfo(f"{name}.npy")
    except KeyError:
        raise CheckpointError(f"array {name!r} is missing") from None
    if info.file_size > limit:
        raise CheckpointError(f"array {name!r} holds {info.file_size} bytes; at most {limit} fit")
    try:
        with npz.zip.open(info) as fh:
            version = np.lib.format.read_magic(fh)
            found, _, found_dtype = NPY_HEADERS[version](fh)
    except Exception as exc:  # KeyError: an .npy format version we do not read
        raise CheckpointError(f"array {name!r} has no readable .npy header ({exc!r})") from None
    if found_dtype != dtype or (found != shape if shape else len(found) != 1):
        expected = f"{np.dtype(dtype)} {shape or '(n,)'}"
        raise CheckpointError(f"array {name!r} is {found_dtype} {found}; expected {expected}")
    try:
        return npz[name]
    except Exception as exc:  # truncated data, bad CRC
        raise CheckpointError(f"array {name!r} cannot be read ({exc})") from None


def _field(header: dict[str, Any], name: str, ok: Callable[[Any], bool], expected: str) -> Any:
    value = header.get(name)
    if not ok(value):
        raise CheckpointError(f"header field {name!r} is {_brief(value)}; expected {expected}")
    return value


def _header(npz: Any) -> dict[str, Any]:
    """The JSON header with every field checked: the rest of the file is read by its word."""
    raw = _read(npz, "header", np.uint8, None, MAX_HEADER_BYTES + NPY_PREAMBLE)
    if raw.size > MAX_HEADER_BYTES:  # the limit save_snapshot keeps to
        raise CheckpointError(f"header holds {raw.size} bytes; at most {MAX_HEADER_BYTES} fit")
    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"header is not UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"header has no {FORMAT!r} format marker; not a state snapshot")
    version = header.get("version")
    if not _is_int(version) or version != VERSION:
        raise CheckpointError(f"format version {_brief(version)}; this edgeseq reads {VERSION}")
    _field(header, "fingerprint", lambda v: isinstance(v, str) and v != "", "a sha256 hex")
    _field(header, "created", lambda v: isinstance(v, str), "an ISO 8601 time")
    _field(header, "extra", lambda v: v is None or isinstance(v, dict), "a JSON object or null")
    _field(header, "states", lambda v: isinstance(v, list), "a list of state arrays")
    ids = _field(header, "ids", _strings, "a list of strings")
    if len(set(ids)) != len(ids):
        twice = next(i for i, n in Counter(ids).items() if n > 1)
        raise CheckpointError(f"stream id {twice!r} appears more than once; ids must be unique")
    return header


def _arrays(npz: Any, header: dict[str, Any]) -> dict[str, np.ndarray]:
    """The stacked state arrays, each declared shape checked before its array is read."""
    ids, specs = header["ids"], header["states"]
    unlisted = sorted(set(npz.files) - {"header", *(f"state{i}" for i in range(len(specs)))})
    if unlisted:
        raise CheckpointError(f"arrays {unlisted[:5]} are not listed in the header")
    if ids and not specs:
        raise CheckpointError(f"the header lists {len(ids)} streams and no state arrays")
    stacked: dict[str, np.ndarray] = {}
    for i, spec in enumerate(specs):
        key, shape = (spec.get("key"), spec.get("shape")) if isinstance(spec, dict) else (0, 0)
        if not (
            isinstance(key, str)
            and key not in stacked
            and isinstance(shape, list)
            and [_is_int(d) for d in shape] == [True, True]
            and shape[0] == len(ids)
            and 1 <= shape[1] <= MAX_WIDTH
        ):
            raise CheckpointError(
                f"header states[{i}] is {_brief(spec)}; expected a new key and shape "
                f"[{len(ids)}, H] with 1 <= H <= {MAX_WIDTH}"
            )
        limit = 4 * shape[0] * shape[1] + NPY_PREAMBLE
        arr = _read(npz, f"state{i}", np.float32, (shape[0], shape[1]), limit)
        if not np.isfinite(arr).all():
            row, col = (int(j) for j in np.argwhere(~np.isfinite(arr))[0])
            raise CheckpointError(
                f"state {key!r} of stream {ids[row]!r} is {arr[row, col]} at [{col}]; "
                "expected finite values"
            )
        stacked[key] = arr
    return stacked


def _parse(fh: IO[bytes], fingerprint: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and stacked arrays of an open file. We open it, not np.load: np.load leaks its
    file handle when the zip is corrupt."""
    try:
        npz = np.load(fh, allow_pickle=False)
    except Exception as exc:  # numpy and zipfile raise many types for hostile files
        raise CheckpointError(f"not a readable state snapshot ({exc})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise CheckpointError("not a readable state snapshot (one array, not an npz)")
    with npz:
        header = _header(npz)
        if fingerprint is not None and header["fingerprint"] != fingerprint:
            raise CheckpointError(
                f"the snapshot belongs to a different model: fingerprint "
                f"{header['fingerprint'][:12]}..., this model's is {fingerprint[:12]}..."
            )
        return header, _arrays(npz, header)


def load_snapshot(path: str | Path, fingerprint: str | None) -> Snapshot:
    """Read a snapshot, refusing it (CheckpointError) unless every check passes; `fingerprint`,
    when given, is the model's, and a snapshot of another model is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such state snapshot file")
    try:
        with open(path, "rb") as fh:
            header, stacked = _parse(fh, fingerprint)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return _snapshot(header, stacked)


def read_snapshot_bytes(data: bytes, fingerprint: str | None, what: str) -> Snapshot:
    """A snapshot held as bytes (snapshot_bytes), with every check load_snapshot makes; `what`
    names it in errors (a key of a bucket, say)."""
    try:
        header, stacked = _parse(io.BytesIO(data), fingerprint)
    except CheckpointError as exc:
        raise CheckpointError(f"{what}: {exc}") from None
    return _snapshot(header, stacked)


def _snapshot(header: dict[str, Any], stacked: dict[str, np.ndarray]) -> Snapshot:
    ids = header["ids"]
    states = {sid: {key: arr[i] for key, arr in stacked.items()} for i, sid in enumerate(ids)}
    return Snapshot(header["fingerprint"], ids, states, header["extra"], header["created"])


def pool_snapshot(pool: StreamPool) -> States:
    """Every stream's state, in the pool's order: what save_snapshot takes."""
    return {sid: pool.state(sid) for sid in pool.ids}


def restore_pool(pool: StreamPool, snapshot: Snapshot) -> None:
    """Put the snapshot's streams into `pool`, keeping its other streams. All or nothing: a
    snapshot that does not fit is refused before any change, and a state the model refuses
    (another model's keys) undoes the streams already restored."""
    new = [sid for sid in snapshot.ids if sid not in pool]
    if len(pool) + len(new) > pool.capacity:
        raise CheckpointError(
            f"the snapshot's {len(snapshot.ids)} streams ({len(new)} new) do not fit: the pool "
            f"holds {len(pool)} of {pool.capacity}; nothing was restored"
        )
    before = {sid: pool.state(sid) for sid in snapshot.ids if sid in pool}
    for sid in snapshot.ids:
        try:
            pool.set_state(sid, snapshot.states[sid])
        except EdgeseqError as exc:
            for added in new:
                pool.evict(added)
            for kept, saved in before.items():
                pool.set_state(kept, saved)
            raise CheckpointError(f"stream {sid!r}: {exc}; nothing was restored") from None
