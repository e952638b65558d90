"""From validated recordings to scaled model arrays for each task shape, split without leakage.

Splits are by time for a single recording (train = oldest rows, then validation, then test) and
by recording otherwise. Scaling is fitted on the training rows only. Evaluation segments keep the
rows before their scored region as context, so a stream can warm up on the past exactly as it
would on a device, while only targets inside the region are scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeseq.data import target_transform
from edgeseq.data.tables import Dataset, Recording
from edgeseq.errors import DataError, UsageError
from edgeseq.spec import DataSpec, Scaling, TargetTransform

# Tasks whose input is the target's own past plus covariates (autoregressive).
AUTOREGRESSIVE_TASKS = ("forecast", "seq2seq")


@dataclass(frozen=True)
class Segment:
    """Rows [0, end) of a recording, of which targets at rows >= score_from are scored."""

    recording: Recording
    end: int
    score_from: int = 0


@dataclass
class Encoded:
    """One segment as model arrays: x (T, F) float32, y (T, O) float32 or (T,) int64, mask (T,)."""

    key: str
    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray
    targets: np.ndarray  # (T, n_targets) physical units, for metrics and baselines
    label: int = -1
    raw_x: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # (T, F):
    # the model's inputs in physical units (the graph's)
    times: np.ndarray | None = None  # (T,) the time column's values, when there is one


@dataclass
class Prepared:
    """Everything training and evaluation need, and the DataSpec the artifact will carry."""

    task: str
    horizon: int
    data_spec: DataSpec
    output_size: int
    train: list[Encoded]
    val: list[Encoded]
    test: list[Encoded]

    @property
    def input_size(self) -> int:
        return len(self.data_spec.features)


def _count(size: float, total: int, what: str) -> int:
    """A split size given as a fraction (< 1) or a count (>= 1) of `total` items."""
    if size < 0:
        raise UsageError(f"{what} must be >= 0, found {size}")
    n = round(size * total) if size < 1 else int(size)
    if n >= total:
        raise UsageError(f"{what} {size} leaves nothing to train on ({total} available)")
    return n


def _split_ids(
    recordings: list[Recording], size: float, what: str, rng: np.random.Generator, stratify: bool
) -> tuple[list[Recording], list[Recording]]:
    """Hold out a share of recordings at random.

    Stratified by label, every label keeps its share on both sides, and at least one recording
    of each label with two or more stays in the part that is kept.
    """
    n_out = _count(size, len(recordings), what)
    if n_out == 0:
        return recordings, []
    groups: dict[str | None, list[int]] = {}
    for i in rng.permutation(len(recordings)):
        groups.setdefault(recordings[i].label if stratify else None, []).append(int(i))
    exact = {k: n_out * len(g) / len(recordings) for k, g in groups.items()}
    quota = {k: int(v) for k, v in exact.items()}
    # The largest remainders take the rounding leftovers, so the quotas add up to n_out.
    for k in sorted(groups, key=lambda k: exact[k] - quota[k], reverse=True):
        if sum(quota.values()) >= n_out:
            break
        quota[k] += 1
    held: set[int] = set()
    for k, group in groups.items():
        cap = len(group) - 1 if len(group) > 1 else len(group)
        held.update(group[: min(quota[k], cap)])
    keep = [r for i, r in enumerate(recordings) if i not in held]
    return keep, [r for i, r in enumerate(recordings) if i in held]


def split(
    data: Dataset,
    test: Dataset | None,
    task: str,
    *,
    val_size: float,
    test_size: float,
    seed: int,
) -> tuple[list[Segment], list[Segment], list[Segment]]:
    """Split into train, validation and test segments with no shared target rows."""
    rng = np.random.default_rng(seed)
    stratify = task == "classify"
    if len(data.recordings) == 1 and task not in ("forecast", "seq2seq"):
        raise DataError(
            f"task {task} needs many recordings (one {'label' if stratify else 'value'} each); "
            "name the column that tells them apart with --id-col"
        )
    if len(data.recordings) > 1 or test is not None:
        pool = data.recordings
        if test is not None:
            test_segs = [Segment(r, len(r)) for r in test.recordings]
        else:
            pool, held = _split_ids(pool, test_size, "--test-size", rng, stratify)
            test_segs = [Segment(r, len(r)) for r in held]
        if len(pool) > 1:
            pool, held_val = _split_ids(pool, val_size, "--val-size", rng, stratify)
            return (
                [Segment(r, len(r)) for r in pool],
                [Segment(r, len(r)) for r in held_val],
                test_segs,
            )
        rec = pool[0]
        n_val = _count(val_size, len(rec), "--val-size")
        end = len(rec) - n_val
        val = [Segment(rec, len(rec), end)] if n_val else []
        return [Segment(rec, end)], val, test_segs
    rec = data.recordings[0]
    n_test = _count(test_size, len(rec), "--test-size")
    n_val = _count(val_size, len(rec) - n_test, "--val-size")
    train_end = len(rec) - n_test - n_val
    val = [Segment(rec, train_end + n_val, train_end)] if n_val else []
    test_segs = [Segment(rec, len(rec), train_end + n_val)] if n_test else []
    return [Segment(rec, train_end)], val, test_segs


def _fit_scaling(blocks: list[np.ndarray], n: int) -> Scaling:
    if n == 0:
        return Scaling((), ())
    values = np.concatenate(blocks, axis=0)
    mean = values.mean(axis=0)
    std = values.std(axis=0)
    std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    return Scaling(tuple(float(v) for v in mean), tuple(float(v) for v in std))


def _scaled(values: np.ndarray, scaling: Scaling) -> np.ndarray:
    return ((values - np.asarray(scaling.mean)) / np.asarray(scaling.std)).astype(np.float32)


def _encode(
    task: str,
    seg: Segment,
    horizon: int,
    feature_scaling: Scaling,
    target_scaling: Scaling,
    label_index: dict[str, int],
    transform: TargetTransform,
) -> Encoded:
    rec = seg.recording
    feats = _scaled(rec.features[: seg.end], feature_scaling)
    raw_targets = rec.targets[: seg.end]
    steps = seg.end
    t = np.arange(steps)
    label = -1
    raw_x: np.ndarray = rec.features[: seg.end]
    y: np.ndarray
    if task in AUTOREGRESSIVE_TASKS:
        raw_x = np.concatenate([raw_targets, raw_x], axis=1)
        # the network reads the transformed targets and predicts the transformed y[t] for
        # targets[t+1 .. t+horizon], horizon-major; valid while t + horizon < T.
        seen = _scaled(target_transform.inputs(raw_targets, transform), target_scaling)
        x = np.concatenate([seen, feats], axis=1)
        future = target_transform.ahead(raw_targets, transform, horizon)
        y = _scaled(future, target_scaling).reshape(steps, -1)
        mask = (t + horizon < steps) & (t + 1 >= seg.score_from)
    elif task == "classify":
        x, label = feats, label_index[str(rec.label)]
        y = np.full(steps, label, dtype=np.int64)
        mask = np.ones(steps, bool)
    elif task == "regress":
        x = feats
        y = np.repeat(_scaled(raw_targets, target_scaling)[-1:], steps, axis=0)
        mask = np.ones(steps, bool)
    else:  # generate: a fixed vector (the first row's features) in at every step
        x = np.repeat(feats[:1], steps, axis=0)
        raw_x = np.repeat(raw_x[:1], steps, axis=0)
        y = _scaled(raw_targets, target_scaling)
        mask = t >= seg.score_from
    times = rec.times[: seg.end] if rec.times is not None else None
    return Encoded(rec.key, np.ascontiguousarray(x), y, mask, raw_targets, label,
                   np.ascontiguousarray(raw_x, np.float32), times)  # fmt: skip


def prepare(
    data: Dataset,
    task: str,
    *,
    horizon: int = 1,
    test: Dataset | None = None,
    val_size: float = 0.15,
    test_size: float = 0.15,
    seed: int = 0,
    transform: TargetTransform | None = None,
) -> Prepared:
    """Split, fit scaling on the training rows, and encode every segment for `task`; a
    forecast's targets go through `transform` first (target_transform.py)."""
    if test is not None and (
        test.feature_names != data.feature_names or test.target_names != data.target_names
    ):
        raise DataError(
            f"the test file's columns {list(test.feature_names + test.target_names)} differ "
            f"from the training file's {list(data.feature_names + data.target_names)}"
        )
    needs_target = task != "classify"
    if needs_target and not data.target_names:
        raise UsageError(f"task {task} needs --target (the column(s) to predict)")
    if task == "classify" and data.columns.label_col is None:
        raise UsageError("task classify needs --label-col (the column holding each label)")
    if task in ("classify", "regress", "generate") and not data.feature_names:
        raise UsageError(f"task {task} needs at least one input feature column")
    train, val, tests = split(data, test, task, val_size=val_size, test_size=test_size, seed=seed)
    feature_scaling = _fit_scaling(
        [s.recording.features[: s.end] for s in train], len(data.feature_names)
    )
    if task not in AUTOREGRESSIVE_TASKS or transform is None or transform.name == "none":
        transform = target_transform.NONE  # the levels, whatever season it was given
    target_scaling = _fit_scaling(
        [target_transform.inputs(s.recording.targets[: s.end], transform) for s in train],
        len(data.target_names),
    )
    labels = sorted({str(s.recording.label) for s in train}) if task == "classify" else []
    index = {name: i for i, name in enumerate(labels)}
    for seg in tests + val:
        if task == "classify" and str(seg.recording.label) not in index:
            raise DataError(
                f"label {seg.recording.label!r} of sequence {seg.recording.key!r} "
                "never occurs in the training data"
            )
    if task in AUTOREGRESSIVE_TASKS:
        features = data.target_names + data.feature_names
        input_scaling = Scaling(
            target_scaling.mean + feature_scaling.mean, target_scaling.std + feature_scaling.std
        )
        output_size = horizon * len(data.target_names)
    else:
        features, input_scaling = data.feature_names, feature_scaling
        output_size = len(labels) if task == "classify" else len(data.target_names)
    spec = DataSpec(
        features=features,
        targets=data.target_names,
        labels=tuple(labels),
        input_scaling=input_scaling,
        target_scaling=target_scaling if data.target_names else None,
        time_col=data.columns.time_col,
        id_col=data.columns.id_col,
        label_col=data.columns.label_col,
        sample_period=data.sample_period,
        time_unit=data.time_unit,
        target_transform=None if transform == target_transform.NONE else transform,
        target_levels=None
        if transform == target_transform.NONE
        else _fit_scaling(
            [target_transform.levels(s.recording.targets[: s.end], transform) for s in train],
            len(data.target_names),
        ),
    )

    def encode(segs: list[Segment]) -> list[Encoded]:
        out = [_encode(task, s, horizon, feature_scaling, target_scaling, index, transform)
               for s in segs]  # fmt: skip
        return [e for e in out if e.mask.any()]

    encoded_train = encode(train)
    if not encoded_train:
        longest = max(s.end for s in train)
        raise DataError(
            f"the training data ({longest} steps at most per sequence) is too short "
            f"for --horizon {horizon}"
        )
    return Prepared(task, horizon, spec, output_size, encoded_train, encode(val), encode(tests))
