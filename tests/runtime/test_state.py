"""State snapshots: exact round trips on the real model, and every damaged file refused."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

import edgeseq
from edgeseq.errors import CheckpointError
from edgeseq.runtime.state_files import (
    Snapshot,
    load_snapshot,
    pool_snapshot,
    restore_pool,
    save_snapshot,
)

ROOT = Path(__file__).resolve().parents[2]
PUMP_LSTM = ROOT / "export" / "pump-lstm.onnx"
FINGERPRINT, OTHER_FINGERPRINT = "ab" * 32, "cd" * 32
N_POOL = 1_000


@pytest.fixture(scope="module")
def model():
    return edgeseq.load(PUMP_LSTM)


def _samples(model, rng, *lead):
    return rng.standard_normal((*lead, model.n_features)).astype(np.float32)


def _toy_states(n_streams=3, width=4):
    """Three streams of a two-key state, each value distinct, so a mix-up cannot pass."""
    return {
        f"s{i}": {
            "lstm.h": np.arange(width, dtype=np.float32) + 10 * i,
            "lstm.c": -np.arange(width, dtype=np.float32) - 10 * i,
        }
        for i in range(n_streams)
    }


def _members(path):
    """The file's arrays as written, with the header decoded: what a tamperer starts from."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    return json.loads(arrays.pop("header").tobytes()), arrays


def _rewrite(path, header, arrays):
    """Write a tampered snapshot with plain np.savez (which pickles object arrays)."""
    raw = (
        np.frombuffer(json.dumps(header).encode(), np.uint8) if isinstance(header, dict) else header
    )
    with open(path, "wb") as fh:
        np.savez(fh, header=raw, **arrays)


@pytest.fixture
def toy_snapshot(tmp_path):
    path = tmp_path / "streams.state"
    save_snapshot(path, FINGERPRINT, _toy_states())
    return path


def test_a_single_stream_round_trips_and_then_steps_exactly_like_the_original(model, tmp_path, rng):
    stream = model.stream()
    stream.feed(_samples(model, rng, 50))
    save_snapshot(tmp_path / "one.state", model.fingerprint, {"pump-1": stream.state})

    snapshot = load_snapshot(tmp_path / "one.state", model.fingerprint)
    restored = model.stream()
    restored.state = snapshot.states["pump-1"]

    assert snapshot.ids == ["pump-1"] and snapshot.fingerprint == model.fingerprint
    for key, value in stream.state.items():
        np.testing.assert_array_equal(restored.state[key], value)
    xs = _samples(model, rng, 30)
    np.testing.assert_array_equal(restored.feed(xs), stream.feed(xs))


def test_a_thousand_stream_pool_round_trips_and_then_steps_exactly_like_the_original(
    model, tmp_path, rng
):
    ids = [f"pump-{i}" for i in range(N_POOL)]
    pool = model.pool(capacity=N_POOL)
    for _ in range(5):
        pool.step(ids, _samples(model, rng, N_POOL))
    seqs = {sid: i for i, sid in enumerate(ids)}
    save_snapshot(tmp_path / "pool.state", model.fingerprint, pool_snapshot(pool), {"seq": seqs})

    snapshot = load_snapshot(tmp_path / "pool.state", model.fingerprint)
    fresh = model.pool(capacity=N_POOL)
    restore_pool(fresh, snapshot)

    assert fresh.ids == ids and snapshot.extra == {"seq": seqs}
    for _ in range(3):
        xs = _samples(model, rng, N_POOL)
        np.testing.assert_array_equal(fresh.step(ids, xs), pool.step(ids, xs))


def test_a_pool_snapshot_is_a_few_stacked_arrays_not_one_entry_per_stream(model, tmp_path):
    pool = model.pool(capacity=N_POOL)
    pool.step([f"s{i}" for i in range(N_POOL)], np.zeros((N_POOL, model.n_features), np.float32))
    save_snapshot(tmp_path / "pool.state", model.fingerprint, pool_snapshot(pool))

    n_keys = len(model.stream().state)
    with zipfile.ZipFile(tmp_path / "pool.state") as zf:
        assert sorted(zf.namelist()) == ["header.npy"] + [f"state{i}.npy" for i in range(n_keys)]
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())
    header, arrays = _members(tmp_path / "pool.state")
    assert {a.shape[0] for a in arrays.values()} == {N_POOL} and header["version"] == 1


def test_the_snapshot_keeps_stream_order_extra_and_creation_time(toy_snapshot):
    snapshot = load_snapshot(toy_snapshot, None)
    assert snapshot.ids == ["s0", "s1", "s2"] and snapshot.extra is None
    assert snapshot.created.endswith("+00:00")
    np.testing.assert_array_equal(snapshot.states["s2"]["lstm.c"], -np.arange(4) - 20)


def test_an_empty_pool_round_trips_as_an_empty_snapshot(tmp_path):
    save_snapshot(tmp_path / "empty.state", FINGERPRINT, {}, {"note": "no streams yet"})
    snapshot = load_snapshot(tmp_path / "empty.state", FINGERPRINT)
    assert (
        snapshot.ids == []
        and snapshot.states == {}
        and snapshot.extra == {"note": "no streams yet"}
    )


def test_a_snapshot_of_a_different_model_is_refused_naming_both_fingerprints(toy_snapshot):
    with pytest.raises(CheckpointError, match="belongs to a different model") as refused:
        load_snapshot(toy_snapshot, OTHER_FINGERPRINT)
    assert FINGERPRINT[:12] in str(refused.value) and OTHER_FINGERPRINT[:12] in str(refused.value)


def test_a_snapshot_of_the_pump_gru_is_refused_by_the_pump_lstm(model, tmp_path):
    gru = edgeseq.load(ROOT / "export" / "pump-gru.onnx")
    save_snapshot(tmp_path / "gru.state", gru.fingerprint, {"a": gru.stream().state})
    with pytest.raises(CheckpointError, match="different model"):
        load_snapshot(tmp_path / "gru.state", model.fingerprint)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such state snapshot file"):
        load_snapshot(tmp_path / "nothing.state", FINGERPRINT)


@pytest.mark.parametrize("kept", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_a_truncated_file_is_refused(toy_snapshot, kept):
    data = toy_snapshot.read_bytes()
    toy_snapshot.write_bytes(data[: int(len(data) * kept)])
    with pytest.raises(CheckpointError, match="not a readable state snapshot"):
        load_snapshot(toy_snapshot, FINGERPRINT)


def test_a_file_of_random_bytes_is_refused(tmp_path, rng):
    path = tmp_path / "noise.state"
    path.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match="not a readable state snapshot"):
        load_snapshot(path, FINGERPRINT)


def test_a_single_npy_array_is_not_a_snapshot(tmp_path):
    path = tmp_path / "array.state"
    with open(path, "wb") as fh:
        np.save(fh, np.zeros(3, np.float32))
    with pytest.raises(CheckpointError, match="not an npz"):
        load_snapshot(path, FINGERPRINT)


def _set(field, value):
    def tamper(header, arrays):
        header[field] = value

    return tamper


def _shape(header, arrays):
    header["states"][0]["shape"] = [3, 5]


def _one_id_fewer(header, arrays):
    header["ids"] = header["ids"][:2]


def _nan(header, arrays):
    arrays["state1"][1, 2] = np.nan


def _extra_array(header, arrays):
    arrays["sneaky"] = np.zeros(4, np.float32)


def _missing_array(header, arrays):
    del arrays["state1"]


def _float64(header, arrays):
    arrays["state0"] = arrays["state0"].astype(np.float64)


def _oversized(header, arrays):
    arrays["state0"] = np.zeros((3, 40_000), np.float32)


def _object_array(header, arrays):
    arrays["state0"] = np.array([[{"a": 1}] * 4] * 3, dtype=object)


TAMPERING = {
    "wrong version": (_set("version", 2), r"format version 2; this edgeseq reads 1"),
    "version true": (_set("version", True), r"format version True"),
    "no format marker": (_set("format", "other"), r"no 'edgeseq.state' format marker"),
    "fingerprint not a string": (_set("fingerprint", 7), r"field 'fingerprint' is 7; expected"),
    "ids not strings": (_set("ids", ["s0", 1, "s2"]), r"field 'ids' .* expected a list of str"),
    "duplicate ids": (_set("ids", ["s0", "s1", "s0"]), r"stream id 's0' appears more than once"),
    "extra not an object": (_set("extra", [1]), r"field 'extra' is \[1\]; expected a JSON obj"),
    "states not a list": (_set("states", "x"), r"field 'states' is 'x'; expected a list"),
    "shape mismatch": (_shape, r"'state0' is float32 \(3, 4\); expected float32 \(3, 5\)"),
    "one id fewer": (_one_id_fewer, r"states\[0\] .* expected a new key and shape \[2, H\]"),
    "NaN in a state": (_nan, r"state 'lstm.c' of stream 's1' is nan at \[2\]; expected finite"),
    "an extra array": (_extra_array, r"arrays \['sneaky'\] are not listed in the header"),
    "a missing array": (_missing_array, r"array 'state1' is missing"),
    "float64 state": (_float64, r"'state0' is float64 \(3, 4\); expected float32 \(3, 4\)"),
    "oversized array": (_oversized, r"'state0' holds 480\d+ bytes; at most 655\d+ fit"),
    "pickled object array": (_object_array, r"'state0' is object \(3, 4\); expected float32"),
}


@pytest.mark.parametrize("tamper, message", TAMPERING.values(), ids=TAMPERING.keys())
def test_a_tampered_snapshot_is_refused_saying_what_where_and_what_was_expected(
    toy_snapshot, tamper, message
):
    header, arrays = _members(toy_snapshot)
    tamper(header, arrays)
    _rewrite(toy_snapshot, header, arrays)
    with pytest.raises(CheckpointError, match=message) as refused:
        load_snapshot(toy_snapshot, FINGERPRINT)
    assert str(refused.value).startswith(f"{toy_snapshot}: ")


@pytest.mark.parametrize(
    "raw, message",
    [
        (np.frombuffer(b"{not json", np.uint8), "header is not UTF-8 JSON"),
        (np.frombuffer(b"\xff\xfe", np.uint8), "header is not UTF-8 JSON"),
        (np.frombuffer(b"[1, 2]", np.uint8), "no 'edgeseq.state' format marker"),
        (np.zeros(8, np.float32), r"'header' is float32 \(8,\); expected uint8 \(n,\)"),
    ],
)
def test_a_header_that_is_not_json_of_the_right_kind_is_refused(toy_snapshot, raw, message):
    _, arrays = _members(toy_snapshot)
    _rewrite(toy_snapshot, raw, arrays)
    with pytest.raises(CheckpointError, match=message):
        load_snapshot(toy_snapshot, FINGERPRINT)


class _Tripwire:
    """Unpickling this touches a file: proof that pickle ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("member", ["header", "state0"])
def test_loading_never_unpickles_even_a_crafted_object_array(
    toy_snapshot, tmp_path, monkeypatch, member
):
    marker = tmp_path / "unpickled"
    header, arrays = _members(toy_snapshot)
    hostile = np.empty(1, dtype=object)
    hostile[0] = _Tripwire(marker)
    if member == "header":
        _rewrite(toy_snapshot, hostile, arrays)
    else:
        _rewrite(toy_snapshot, header, {**arrays, member: hostile})

    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    with pytest.raises(CheckpointError, match=f"'{member}' is object"):
        load_snapshot(toy_snapshot, None)
    assert not marker.exists()


def _snapshot_files(directory):
    return sorted(p.name for p in Path(directory).iterdir())


def test_a_failed_rename_keeps_the_previous_snapshot_and_leaves_no_temp_file(
    toy_snapshot, monkeypatch
):
    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(CheckpointError, match=r"cannot write .*No space left on device"):
        save_snapshot(toy_snapshot, FINGERPRINT, _toy_states(n_streams=5))

    monkeypatch.undo()
    assert load_snapshot(toy_snapshot, FINGERPRINT).ids == ["s0", "s1", "s2"]
    assert _snapshot_files(toy_snapshot.parent) == [toy_snapshot.name]


@pytest.mark.parametrize(
    "failure, raised",
    [(OSError(5, "Input/output error"), CheckpointError), (KeyboardInterrupt(), KeyboardInterrupt)],
)
def test_a_write_that_fails_midway_keeps_the_previous_snapshot_and_leaves_no_temp_file(
    toy_snapshot, monkeypatch, failure, raised
):
    write_array, written = np.lib.format.write_array, []

    def fail_on_the_second_array(fh, arr, **kwargs):
        if written:
            fh.write(b"\x93NUMPY half an array")
            raise failure
        written.append(arr)
        write_array(fh, arr, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", fail_on_the_second_array)
    with pytest.raises(raised):
        save_snapshot(toy_snapshot, FINGERPRINT, _toy_states(n_streams=5))

    monkeypatch.undo()
    assert load_snapshot(toy_snapshot, FINGERPRINT).ids == ["s0", "s1", "s2"]
    assert _snapshot_files(toy_snapshot.parent) == [toy_snapshot.name]


def test_a_failed_first_write_leaves_no_file_at_all(tmp_path, monkeypatch):
    def fail(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(CheckpointError, match="cannot write"):
        save_snapshot(tmp_path / "new.state", FINGERPRINT, _toy_states())
    assert _snapshot_files(tmp_path) == []


@pytest.mark.parametrize(
    "states, extra, message",
    [
        ({"a": {"h": np.array([0.0, np.inf])}}, None, "state 'h' of stream 'a' holds NaN or inf"),
        ({"a": {"h": np.zeros(2)}, "b": {"c": np.zeros(2)}}, None, "stream 'b' has state keys"),
        ({"a": {"h": np.zeros(2)}, "b": {"h": np.zeros(3)}}, None, "differs in shape"),
        ({"a": {"h": np.zeros((2, 2))}}, None, r"has shape \(2, 2\); expected \(H,\)"),
        ({"a": {"h": np.zeros(2)}}, {"when": object()}, "extra .* is not plain JSON"),
        ({"a": {"h": np.zeros(2)}}, {"gap": float("nan")}, "extra .* is not plain JSON"),
    ],
)
def test_states_that_could_not_be_loaded_back_are_refused_before_writing(
    tmp_path, states, extra, message
):
    with pytest.raises(CheckpointError, match=message):
        save_snapshot(tmp_path / "bad.state", FINGERPRINT, states, extra)
    assert _snapshot_files(tmp_path) == []


def test_a_header_too_large_to_load_back_is_refused_before_writing(toy_snapshot, monkeypatch):
    """Ids and extra of a huge fleet can outgrow what load_snapshot reads: writing such a file
    would replace the last good checkpoint with one the next start refuses."""
    import edgeseq.runtime.state_files as state_module

    monkeypatch.setattr(state_module, "MAX_HEADER_BYTES", 300)
    with pytest.raises(
        CheckpointError, match=r"header of 50 streams is [\d,]+ bytes .* not written"
    ):
        save_snapshot(toy_snapshot, FINGERPRINT, _toy_states(n_streams=50))
    monkeypatch.undo()
    assert load_snapshot(toy_snapshot, FINGERPRINT).ids == ["s0", "s1", "s2"]


def test_a_header_exactly_at_the_limit_is_written_and_loads_back(tmp_path, monkeypatch):
    """The writer counts the JSON's bytes, the reader the .npy member (its own preamble too):
    both must draw the line at the same header."""
    import edgeseq.runtime.state_files as state_module

    path, states = tmp_path / "edge.state", _toy_states(n_streams=3)
    save_snapshot(path, FINGERPRINT, states, {"pad": ""})
    header = len(np.load(path)["header"])
    monkeypatch.setattr(state_module, "MAX_HEADER_BYTES", header + 10)
    save_snapshot(path, FINGERPRINT, states, {"pad": "x" * 10})  # exactly at the limit
    assert load_snapshot(path, FINGERPRINT).extra == {"pad": "x" * 10}
    with pytest.raises(CheckpointError, match="not written"):
        save_snapshot(path, FINGERPRINT, states, {"pad": "x" * 11})


def _pool_contents(pool):
    return {sid: pool.state(sid) for sid in pool.ids}


def _assert_same_contents(pool, contents):
    assert sorted(pool.ids) == sorted(contents)
    for sid, state in contents.items():
        for key, value in state.items():
            np.testing.assert_array_equal(pool.state(sid)[key], value)


def test_a_snapshot_larger_than_the_pool_is_refused_before_anything_changes(model, tmp_path, rng):
    big = model.pool(capacity=4)
    big.step(["a", "b", "c", "d"], _samples(model, rng, 4))
    save_snapshot(tmp_path / "big.state", model.fingerprint, pool_snapshot(big))
    small = model.pool(capacity=3)
    small.step(["a", "z"], _samples(model, rng, 2))
    before = _pool_contents(small)

    with pytest.raises(CheckpointError, match=r"4 streams \(3 new\) do not fit.* 2 of 3"):
        restore_pool(small, load_snapshot(tmp_path / "big.state", model.fingerprint))
    _assert_same_contents(small, before)


def test_restoring_keeps_the_pools_other_streams(model, tmp_path, rng):
    source = model.pool(capacity=2)
    source.step(["a", "b"], _samples(model, rng, 2))
    save_snapshot(tmp_path / "ab.state", model.fingerprint, pool_snapshot(source))
    target = model.pool(capacity=3)
    target.step(["b", "z"], _samples(model, rng, 2))
    z_before = target.state("z")

    restore_pool(target, load_snapshot(tmp_path / "ab.state", model.fingerprint))

    assert sorted(target.ids) == ["a", "b", "z"]
    _assert_same_contents(target, {**_pool_contents(source), "z": z_before})


def test_states_the_model_refuses_leave_the_pool_as_it_was(model, tmp_path, rng):
    save_snapshot(tmp_path / "toy.state", FINGERPRINT, _toy_states())
    pool = model.pool(capacity=8)
    pool.step(["s0", "x"], _samples(model, rng, 2))
    before = _pool_contents(pool)

    with pytest.raises(CheckpointError, match="stream 's0': state has keys"):
        restore_pool(pool, load_snapshot(tmp_path / "toy.state", None))
    _assert_same_contents(pool, before)


def test_a_stream_the_model_refuses_midway_undoes_the_streams_restored_before_it(model, rng):
    good = model.stream().state
    pool = model.pool(capacity=8)
    pool.step(["kept", "x"], _samples(model, rng, 2))
    before = _pool_contents(pool)
    mixed = Snapshot(
        FINGERPRINT,
        ["new", "kept", "bad"],
        {"new": good, "kept": good, "bad": {"lstm.h": np.zeros(4, np.float32)}},
        None,
        "2024-01-01T00:00:00+00:00",
    )

    with pytest.raises(CheckpointError, match="stream 'bad': state has keys"):
        restore_pool(pool, mixed)
    _assert_same_contents(pool, before)
