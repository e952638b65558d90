"""Tabular time series in, validated recordings out (the training side; needs pandas).

A *recording* is one sequence: the rows of one `--id-col` value (or the whole file), ordered by
`--time-col`. Everything that can be wrong with a user's file is caught here and reported with the
row, the column and what was expected, so the model code never sees a NaN or a string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from edgeseq.errors import DataError, UsageError

FILL_POLICIES = ("error", "ffill", "interpolate", "zero", "drop")


@dataclass(frozen=True)
class Columns:
    """Which columns play which role. `features=None` means: every other numeric column."""

    targets: tuple[str, ...] = ()
    features: tuple[str, ...] | None = None
    time_col: str | None = None
    id_col: str | None = None
    label_col: str | None = None


@dataclass
class Recording:
    """One sequence: raw (unscaled) feature and target values in time order."""

    key: str
    features: np.ndarray  # (T, n_features) float64
    targets: np.ndarray  # (T, n_targets) float64
    label: str | None = None
    times: np.ndarray | None = None  # (T,) the time column's values in order (plots' x axis)

    def __len__(self) -> int:
        return int(self.features.shape[0])


@dataclass
class Dataset:
    """Recordings plus the names and facts the artifact must remember about them."""

    recordings: list[Recording]
    feature_names: tuple[str, ...]
    target_names: tuple[str, ...]
    columns: Columns
    sample_period: float | None = None  # median step of the time column
    time_unit: str | None = None  # "s" for date-time columns; None: the column's own unit

    @property
    def n_rows(self) -> int:
        return sum(len(r) for r in self.recordings)


def read_csv(path: str | Path) -> pd.DataFrame:
    """Read a CSV file into a DataFrame, turning every I/O or parse failure into a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; expected a CSV with a header row") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable CSV file ({first})") from None
    if frame.empty:
        raise DataError(f"{path}: the file has a header but no data rows")
    return frame


def _where(frame: pd.DataFrame, position: int) -> str:
    """Name the row at `position` of `frame` by its place in the file (index = file row)."""
    row = int(frame.index[position])
    return f"row {row + 1} (line {row + 2})"


def _check_named(frame: pd.DataFrame, names: Sequence[str], option: str, source: str) -> None:
    for name in names:
        if name not in frame.columns:
            have = ", ".join(map(str, frame.columns))
            raise DataError(f"{source}: {option} column {name!r} not found; columns are: {have}")


def _numeric(frame: pd.DataFrame, name: str, source: str) -> pd.Series:
    """Column `name` as float64; a cell that is not a number is reported with its row."""
    column = frame[name]
    if pd.api.types.is_bool_dtype(column):
        return column.astype("float64")
    if pd.api.types.is_numeric_dtype(column):
        return column.astype("float64")
    converted = pd.to_numeric(column, errors="coerce")
    bad = np.flatnonzero(converted.isna().to_numpy() & column.notna().to_numpy())
    if bad.size:
        pos = int(bad[0])
        raise DataError(
            f"{source}: {_where(frame, pos)}, column {name!r}: {column.iloc[pos]!r} is not a number"
        )
    return converted.astype("float64")


def _resolve_features(frame: pd.DataFrame, columns: Columns) -> tuple[str, ...]:
    if columns.features is not None:
        return columns.features
    taken = set(columns.targets) | {columns.time_col, columns.id_col, columns.label_col}
    # A mostly numeric text column is numeric with a typo: keep it, so the bad cell is reported
    # instead of the column silently dropping out of the model's inputs.
    numeric = [str(c) for c in frame.columns if c not in taken and _mostly_numeric(frame[c])]
    # For forecast and seq2seq these are covariates: the target's own past is always an input.
    return tuple(numeric)


def _mostly_numeric(column: pd.Series) -> bool:
    if pd.api.types.is_numeric_dtype(column):
        return True
    present = column.dropna()
    return bool(len(present)) and pd.to_numeric(present, errors="coerce").notna().mean() > 0.5


def _fill(values: pd.DataFrame, policy: str, source: str) -> pd.DataFrame:
    missing = values.isna().to_numpy()
    if not missing.any():
        return values
    if policy == "error":
        pos, col = (int(v[0]) for v in np.nonzero(missing))
        raise DataError(
            f"{source}: {_where(values, pos)}, column {values.columns[col]!r}: missing value; "
            f"choose a policy with --fill ({', '.join(FILL_POLICIES[1:])})"
        )
    if policy == "zero":
        return values.fillna(0.0)
    if policy == "ffill":
        return values.ffill().bfill()
    if policy == "interpolate":
        return values.interpolate(method="linear", limit_direction="both")
    raise AssertionError(policy)  # "drop" is handled before grouping


def _stamps(column: pd.Series) -> np.ndarray:
    """A time column's values (already ordered and checked by _order): numbers, or dates."""
    if pd.api.types.is_numeric_dtype(column):
        return column.to_numpy(np.float64)
    return pd.to_datetime(column, format="mixed").to_numpy()


def _order(frame: pd.DataFrame, time_col: str, source: str) -> tuple[pd.DataFrame, pd.Series]:
    """Sort by the time column (numeric or date-like); returns the frame and time in seconds."""
    raw = frame[time_col]
    if pd.api.types.is_numeric_dtype(raw):
        seconds = raw.astype("float64")
    else:
        try:
            stamps = pd.to_datetime(raw, errors="raise", format="mixed")
        except (ValueError, TypeError):
            stamps = pd.to_datetime(raw, errors="coerce", format="mixed")
            pos = int(np.flatnonzero(stamps.isna().to_numpy())[0])
            raise DataError(
                f"{source}: {_where(frame, pos)}, column {time_col!r}: {raw.iloc[pos]!r} is "
                "neither a number nor a date"
            ) from None
        seconds = (stamps - stamps.min()).dt.total_seconds()
    if seconds.isna().any():
        pos = int(np.flatnonzero(seconds.isna().to_numpy())[0])
        raise DataError(f"{source}: {_where(frame, pos)}, column {time_col!r}: missing time")
    order = np.argsort(seconds.to_numpy(), kind="stable")
    return frame.iloc[order], seconds.iloc[order]


def _sample_period(times: list[np.ndarray]) -> float | None:
    steps = np.concatenate([np.diff(t) for t in times if t.size > 1]) if times else np.array([])
    if steps.size == 0:
        return None
    period = float(np.median(steps))
    return period if period > 0 else None


def from_frame(
    frame: pd.DataFrame, columns: Columns, *, fill: str = "error", source: str = "data"
) -> Dataset:
    """Validate a DataFrame and split it into recordings (one per id, time-ordered)."""
    if fill not in FILL_POLICIES:
        raise UsageError(f"--fill {fill!r} is not one of {', '.join(FILL_POLICIES)}")
    if frame.empty:
        raise DataError(f"{source}: no data rows")
    named = [c for c in (columns.time_col, columns.id_col, columns.label_col) if c]
    _check_named(frame, columns.targets, "--target", source)
    _check_named(frame, named, "time/id/label", source)
    features = _resolve_features(frame, columns)
    _check_named(frame, features, "--features", source)
    clash = set(features) & (set(columns.targets) | set(named))
    if clash:
        raise UsageError(f"column(s) {sorted(clash)} named both as a feature and in another role")
    frame = frame.reset_index(drop=True)
    numeric_names = list(dict.fromkeys([*features, *columns.targets]))
    values = pd.DataFrame({n: _numeric(frame, n, source) for n in numeric_names})
    if fill == "drop":
        keep = values.notna().all(axis=1).to_numpy()
        frame, values = frame[keep], values[keep]  # keep file rows as the index, for errors
        if frame.empty:
            raise DataError(
                f"{source}: every row has a missing value; nothing left after --fill drop"
            )
    if columns.label_col and frame[columns.label_col].isna().any():
        pos = int(np.flatnonzero(frame[columns.label_col].isna().to_numpy())[0])
        raise DataError(
            f"{source}: {_where(frame, pos)}, column {columns.label_col!r}: missing label"
        )
    groups = (
        [(str(k), g.index.to_numpy()) for k, g in frame.groupby(columns.id_col, sort=False)]
        if columns.id_col
        else [("all", frame.index.to_numpy())]
    )
    recordings, times = [], []
    time_unit = (
        "s"
        if columns.time_col and not pd.api.types.is_numeric_dtype(frame[columns.time_col])
        else None
    )
    for key, rows in groups:
        part = frame.loc[rows]
        if columns.time_col:
            part, seconds = _order(part, columns.time_col, source)
            times.append(seconds.to_numpy())
        stamps = _stamps(part[columns.time_col]) if columns.time_col else None
        part_values = _fill(values.loc[part.index], fill, source)
        label = None
        if columns.label_col:
            distinct = part[columns.label_col].astype(str).unique()
            if len(distinct) > 1:
                hint = ("; is each recording named in a column? give it with --id-col"
                        if columns.id_col is None else "")  # fmt: skip
                raise DataError(
                    f"{source}: sequence {key!r} has several labels {sorted(distinct)[:5]}; "
                    f"expected one label per sequence{hint}"
                )
            label = str(distinct[0])
        recordings.append(
            Recording(
                key=key,
                features=part_values[list(features)].to_numpy(np.float64).reshape(len(part), -1),
                targets=part_values[list(columns.targets)]
                .to_numpy(np.float64)
                .reshape(len(part), -1),
                label=label,
                times=stamps,
            )
        )
    return Dataset(
        recordings=recordings,
        feature_names=features,
        target_names=columns.targets,
        columns=Columns(
            columns.targets, features, columns.time_col, columns.id_col, columns.label_col
        ),
        sample_period=_sample_period(times),
        time_unit=time_unit,
    )


def load_csv(path: str | Path, columns: Columns, *, fill: str = "error") -> Dataset:
    """Read and validate a CSV file (see `from_frame`)."""
    return from_frame(read_csv(path), columns, fill=fill, source=str(path))


def from_arrays(
    features: np.ndarray,
    targets: np.ndarray | None = None,
    labels: Sequence[str] | None = None,
    *,
    feature_names: Sequence[str] | None = None,
    target_names: Sequence[str] | None = None,
) -> Dataset:
    """Build a Dataset from NumPy arrays: (T, F) for one recording or (N, T, F) for N of them.

    `targets` has the same leading shape with its own last axis; `labels` one entry per recording.
    """
    x = np.asarray(features, dtype=np.float64)
    single = x.ndim == 2
    if single:
        x = x[None]
    if x.ndim != 3 or x.shape[1] == 0:
        raise DataError(f"features must have shape (T, F) or (N, T, F), found {np.shape(features)}")
    y = np.zeros((*x.shape[:2], 0)) if targets is None else np.asarray(targets, dtype=np.float64)
    if single and targets is not None:
        y = y[None]
    if y.ndim == 2:
        y = y[..., None]
    if y.shape[:2] != x.shape[:2]:
        raise DataError(f"targets have shape {y.shape[:2]} in (N, T); features have {x.shape[:2]}")
    if labels is not None and len(labels) != x.shape[0]:
        raise DataError(f"{len(labels)} labels for {x.shape[0]} recordings")
    for name, arr in (("features", x), ("targets", y)):
        if not np.isfinite(arr).all():
            n, t, f = (int(v[0]) for v in np.nonzero(~np.isfinite(arr)))
            raise DataError(f"{name}[{n}, {t}, {f}] is {arr[n, t, f]}; expected finite values")
    fnames = tuple(feature_names or (f"x{i}" for i in range(x.shape[2])))
    tnames = tuple(target_names or (f"y{i}" for i in range(y.shape[2])))
    recordings = [
        Recording(str(i), x[i], y[i], None if labels is None else str(labels[i]))
        for i in range(x.shape[0])
    ]
    label_col = None if labels is None else "label"
    return Dataset(recordings, fnames, tnames, Columns(tnames, fnames, label_col=label_col))
