"""Loading, validating and splitting tabular data through the Python API."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from edgeseq.data.prepare import prepare, split
from edgeseq.data.tables import Columns, from_arrays, from_frame, load_csv
from edgeseq.errors import DataError, UsageError

ROW_TOLERANCE = 1e-3  # float32 round trip of a row index through the target scaling


def write_csv(tmp_path, text):
    path = tmp_path / "data.csv"
    path.write_text(text)
    return path


def series(n=40, **extra):
    """One series whose target equals its row index, so scored rows can be read off the values."""
    t = np.arange(n)
    return pd.DataFrame({"t": t, "x": np.sin(t), "y": t.astype(float), **extra})


def recordings(labels, length=lambda i: 5 + i % 4):
    rows = [
        {"id": f"r{i:02d}", "t": t, "x": float(i + t), "y": float(i), "label": label}
        for i, label in enumerate(labels)
        for t in range(length(i))
    ]
    return pd.DataFrame(rows)


def test_default_features_are_every_numeric_column_not_named_in_another_role():
    frame = pd.DataFrame(
        {"t": [0, 1], "id": [7, 7], "label": [1, 1], "a": [0.5, 1.5], "note": ["p", "q"],
         "y": [1.0, 2.0], "b": [3, 4]}
    )  # fmt: skip
    columns = Columns(targets=("y",), time_col="t", id_col="id", label_col="label")
    data = from_frame(frame, columns)
    assert data.feature_names == ("a", "b")
    assert data.columns.features == ("a", "b")
    np.testing.assert_array_equal(data.recordings[0].features, [[0.5, 3.0], [1.5, 4.0]])


def test_rows_are_put_in_order_by_a_numeric_time_column():
    frame = pd.DataFrame({"t": [2.0, 0.0, 3.0, 1.0], "x": [20, 0, 30, 10], "y": [2, 0, 3, 1]})
    data = from_frame(frame, Columns(targets=("y",), time_col="t"))
    np.testing.assert_array_equal(data.recordings[0].features[:, 0], [0, 10, 20, 30])
    np.testing.assert_array_equal(data.recordings[0].targets[:, 0], [0, 1, 2, 3])
    assert data.sample_period == 1.0


def test_rows_are_put_in_order_by_a_date_time_column(tmp_path):
    path = write_csv(
        tmp_path,
        "when,x,y\n2024-03-01 02:00:00,2,20\n2024-03-01 00:00:00,0,0\n2024-03-01 01:00:00,1,10\n",
    )
    data = load_csv(path, Columns(targets=("y",), time_col="when"))
    assert data.feature_names == ("x",)
    np.testing.assert_array_equal(data.recordings[0].features[:, 0], [0, 1, 2])
    assert data.sample_period == 3600.0


def test_each_id_value_becomes_one_recording_with_its_own_length():
    frame = pd.DataFrame(
        {"id": list("babcab"), "t": [2, 1, 0, 0, 0, 1], "x": [12, 21, 10, 30, 20, 11]}
    )
    data = from_frame(frame, Columns(time_col="t", id_col="id"))
    by_key = {r.key: r.features[:, 0].tolist() for r in data.recordings}
    assert by_key == {"a": [20, 21], "b": [10, 11, 12], "c": [30]}
    assert data.n_rows == len(frame)


MISSING_IN_PLAIN_FILE = "t,x,y\n0,1,1\n1,1,1\n2,,1\n3,1,1\n"
MISSING_IN_SECOND_RECORDING = "id,t,x,y\na,0,1,1\na,1,1,1\nb,0,1,1\nb,1,,1\n"
MISSING_IN_UNSORTED_FILE = "t,x,y\n3,1,1\n2,1,1\n1,,1\n0,1,1\n"


@pytest.mark.parametrize(
    ("text", "row"),
    [
        pytest.param(MISSING_IN_PLAIN_FILE, 3, id="plain"),
        pytest.param(MISSING_IN_SECOND_RECORDING, 4, id="second-recording"),
        pytest.param(MISSING_IN_UNSORTED_FILE, 3, id="unsorted"),
    ],
)  # fmt: skip
def test_a_missing_value_is_an_error_that_names_its_file_row_and_column(tmp_path, text, row):
    columns = Columns(targets=("y",), time_col="t", id_col="id" if "id" in text else None)
    with pytest.raises(DataError, match=rf"row {row} \(line {row + 1}\), column 'x': missing"):
        load_csv(write_csv(tmp_path, text), columns)


@pytest.mark.parametrize(
    ("policy", "x", "y"),
    [
        ("ffill", [2, 2, 2, 6], [0, 1, 2, 3]),
        ("interpolate", [2, 2, 4, 6], [0, 1, 2, 3]),
        ("zero", [0, 2, 0, 6], [0, 1, 2, 3]),
        ("drop", [2, 6], [1, 3]),
    ],
)
def test_each_fill_policy_replaces_or_removes_missing_values(policy, x, y):
    frame = pd.DataFrame({"t": [0, 1, 2, 3], "x": [np.nan, 2, np.nan, 6], "y": [0, 1, 2, 3]})
    data = from_frame(frame, Columns(targets=("y",), time_col="t"), fill=policy)
    np.testing.assert_array_equal(data.recordings[0].features[:, 0], x)
    np.testing.assert_array_equal(data.recordings[0].targets[:, 0], y)


def test_filling_never_carries_values_from_one_recording_into_another():
    frame = pd.DataFrame({"id": ["a", "a", "b", "b"], "t": [0, 1, 0, 1], "x": [1, 2, np.nan, 5]})
    data = from_frame(frame, Columns(time_col="t", id_col="id"), fill="ffill")
    assert data.recordings[1].features[:, 0].tolist() == [5, 5]


def test_an_unknown_fill_policy_is_a_usage_error():
    with pytest.raises(UsageError, match="--fill 'mean'"):
        from_frame(series(), Columns(targets=("y",)), fill="mean")


@pytest.mark.parametrize(
    ("columns", "column"),
    [
        pytest.param(Columns(targets=("y",), features=("x",)), "x", id="named-feature"),
        pytest.param(Columns(targets=("x",)), "x", id="target"),
        pytest.param(Columns(targets=("y",)), "x", id="default-feature"),
    ],
)  # fmt: skip
def test_a_non_numeric_cell_is_reported_with_its_row_and_column(tmp_path, columns, column):
    path = write_csv(tmp_path, "t,x,y\n0,1.5,1\n1,2.5,2\n2,abc,3\n3,4.5,4\n")
    with pytest.raises(DataError, match=rf"row 3 \(line 4\), column '{column}': 'abc' is not a"):
        load_csv(path, columns)


def test_a_column_that_is_not_in_the_file_is_named_in_the_error(tmp_path):
    with pytest.raises(DataError, match="--target column 'pressure' not found"):
        load_csv(write_csv(tmp_path, "t,x,y\n0,1,2\n"), Columns(targets=("pressure",)))


def test_a_label_that_varies_within_a_sequence_is_an_error():
    labels = ["on", "off", "on", "on"]
    frame = pd.DataFrame({"id": [1, 1, 2, 2], "x": [0, 1, 2, 3], "label": labels})
    with pytest.raises(DataError, match="sequence '1' has several labels"):
        from_frame(frame, Columns(id_col="id", label_col="label"))


def scored_rows(prepared, encoded):
    """Row indices of the targets scored in `encoded` (series() makes target == row index)."""
    scaling = prepared.data_spec.target_scaling
    rows = encoded.y[encoded.mask] * scaling.std[0] + scaling.mean[0]
    assert np.allclose(rows, np.round(rows), atol=ROW_TOLERANCE)
    return set(np.round(rows).astype(int).ravel().tolist())


@pytest.mark.parametrize(("task", "horizon"), [("forecast", 1), ("forecast", 3), ("seq2seq", 2)])
def test_time_splits_of_one_series_score_disjoint_target_rows(task, horizon):
    data = from_frame(series(60), Columns(targets=("y",), time_col="t"))
    prepared = prepare(data, task, horizon=horizon, val_size=0.2, test_size=0.2)
    parts = [prepared.train, prepared.val, prepared.test]
    assert [len(p) for p in parts] == [1, 1, 1]
    train, val, test = (scored_rows(prepared, p[0]) for p in parts)
    assert train and val and test
    assert max(train) < min(val) and max(val) < min(test)


def test_splits_by_id_keep_whole_recordings_apart():
    frame = recordings(["x"] * 20)
    data = from_frame(frame, Columns(targets=("y",), time_col="t", id_col="id"))
    prepared = prepare(data, "regress", val_size=0.2, test_size=0.2, seed=3)
    keys = [[e.key for e in p] for p in (prepared.train, prepared.val, prepared.test)]
    assert [len(k) for k in keys] == [13, 3, 4]
    assert sorted(k for part in keys for k in part) == sorted(frame["id"].unique())
    lengths = frame.groupby("id").size()
    for encoded in prepared.train + prepared.val + prepared.test:
        assert len(encoded.x) == lengths[encoded.key]


@pytest.mark.parametrize(
    ("labels", "test_size"),
    [
        pytest.param(["on", "off"] * 10, 0.2, id="balanced"),
        pytest.param(["on"] * 9 + ["off"] * 3, 0.5, id="imbalanced"),
    ],
)  # fmt: skip
def test_splits_by_id_stratify_labels_so_each_split_has_its_share(labels, test_size):
    data = from_frame(recordings(labels), Columns(time_col="t", id_col="id", label_col="label"))
    train, val, test = split(data, None, "classify", val_size=0.2, test_size=test_size, seed=0)
    for part in (train, val, test):
        for label in set(labels):
            share = labels.count(label) / len(labels) * len(part)
            count = sum(s.recording.label == label for s in part)
            assert abs(count - share) < 1, (label, [s.recording.label for s in part])


@pytest.mark.parametrize(("rows", "changes"), [("test", False), ("val", False), ("train", True)])
def test_scaling_is_fitted_on_the_training_rows_of_one_series_only(rows, changes):
    frame = series(100, z=np.cos(np.arange(100)))
    columns = Columns(targets=("y",), time_col="t")
    before = prepare(from_frame(frame, columns), "forecast", val_size=0.2, test_size=0.2)
    where = {"train": slice(0, 10), "val": slice(64, 80), "test": slice(80, 100)}[rows]
    frame.loc[frame.index[where], ["x", "y", "z"]] *= 1000.0
    after = prepare(from_frame(frame, columns), "forecast", val_size=0.2, test_size=0.2)
    assert (after.data_spec != before.data_spec) is changes


def test_scaling_ignores_recordings_held_out_for_testing():
    frame = recordings(["x"] * 12)
    columns = Columns(targets=("y",), time_col="t", id_col="id")
    before = prepare(from_frame(frame, columns), "regress", val_size=0.2, test_size=0.25)
    held = frame["id"].isin([e.key for e in before.test])
    assert held.any()
    frame.loc[held, ["x", "y"]] = -5000.0
    after = prepare(from_frame(frame, columns), "regress", val_size=0.2, test_size=0.25)
    assert [e.key for e in after.test] == [e.key for e in before.test]
    assert after.data_spec == before.data_spec


@pytest.mark.parametrize("target_shape", [(30, 1), (30,), None])
def test_from_arrays_takes_one_recording_as_time_by_features(target_shape):
    x = np.arange(60.0).reshape(30, 2)
    y = None if target_shape is None else np.arange(30.0).reshape(target_shape)
    data = from_arrays(x, y, feature_names=["a", "b"])
    assert len(data.recordings) == 1
    np.testing.assert_array_equal(data.recordings[0].features, x)
    assert data.feature_names == ("a", "b")
    assert data.recordings[0].targets.shape == (30, 0 if y is None else 1)


def test_from_arrays_takes_many_recordings_as_count_by_time_by_features():
    x = np.random.default_rng(0).normal(size=(4, 10, 3))
    data = from_arrays(x, x[..., :1] * 2, labels=["a", "b", "a", "b"])
    assert [len(r) for r in data.recordings] == [10] * 4
    assert [r.label for r in data.recordings] == ["a", "b", "a", "b"]
    np.testing.assert_array_equal(data.recordings[2].targets[:, 0], x[2, :, 0] * 2)
    assert data.target_names == ("y0",)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["features", "targets"])
def test_from_arrays_rejects_values_that_are_not_finite(bad, where):
    x, y = np.zeros((2, 5, 3)), np.zeros((2, 5, 1))
    (x if where == "features" else y)[1, 4, 0] = bad
    with pytest.raises(DataError, match=rf"{where}\[1, 4, 0\] is {bad}"):
        from_arrays(x, y)
