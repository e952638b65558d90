"""ModelSpec and DataSpec: the contract that training, export, the runtime and the daemon share.

Both travel inside every checkpoint and every exported artifact as plain JSON (STYLE.md #2: the
artifact describes itself), so they are validated whenever they are read back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from edgeseq.errors import ModelFormatError

CELLS = ("rnn", "lstm", "gru")
TASKS = ("forecast", "classify", "regress", "seq2seq", "generate")
NONLINEARITIES = ("tanh", "relu")
FORMAT_VERSION = 1


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ModelFormatError(what)


def _from_mapping(cls: type, data: Any, where: str) -> dict[str, Any]:
    """Check `data` is a mapping whose keys are exactly fields of `cls` (extras refused)."""
    _require(isinstance(data, dict), f"{where} must be a JSON object, found {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    _require(not unknown, f"{where} has unknown keys {unknown}; expected some of {sorted(known)}")
    return dict(data)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network (not its weights).

    `output_size` is the width of the head at every time step: horizon * n_targets for forecast
    and seq2seq, the number of classes for classify, n_targets for regress and generate.
    """

    task: str
    cell: str
    input_size: int
    hidden_size: int
    num_layers: int
    output_size: int
    horizon: int = 1
    n_targets: int = 1
    nonlinearity: str = "tanh"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _require(self.task in TASKS, f"task {self.task!r} is not one of {', '.join(TASKS)}")
        _require(self.cell in CELLS, f"cell {self.cell!r} is not one of {', '.join(CELLS)}")
        _require(
            self.nonlinearity in NONLINEARITIES,
            f"nonlinearity {self.nonlinearity!r} is not one of {', '.join(NONLINEARITIES)}",
        )
        for name in ("input_size", "hidden_size", "num_layers", "output_size", "horizon"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and 1 <= value <= 1_000_000,
                f"{name} must be an integer in 1..1000000, found {value!r}",
            )
        _require(
            isinstance(self.n_targets, int) and 0 <= self.n_targets <= 1_000_000,
            f"n_targets must be an integer >= 0, found {self.n_targets!r}",
        )
        _require(
            isinstance(self.dropout, int | float) and 0.0 <= self.dropout < 1.0,
            f"dropout must be in [0, 1), found {self.dropout!r}",
        )

    @property
    def has_cell_state(self) -> bool:
        return self.cell == "lstm"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ModelSpec:
        return cls(**_from_mapping(cls, data, "model spec"))


@dataclass(frozen=True)
class Scaling:
    """Per-column affine scaling fitted on the training split: z = (v - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        _require(len(self.mean) == len(self.std), "scaling mean and std differ in length")
        for m, s in zip(self.mean, self.std, strict=True):
            _require(math.isfinite(m), f"scaling mean {m!r} is not finite")
            _require(math.isfinite(s) and s > 0, f"scaling std {s!r} is not a positive number")

    @classmethod
    def identity(cls, n: int) -> Scaling:
        return cls(mean=(0.0,) * n, std=(1.0,) * n)

    @classmethod
    def from_dict(cls, data: Any) -> Scaling:
        raw = _from_mapping(cls, data, "scaling")
        return cls(
            mean=tuple(float(v) for v in raw["mean"]), std=tuple(float(v) for v in raw["std"])
        )


@dataclass(frozen=True)
class DataSpec:
    """What the columns mean: names, order, scaling and labels, as fitted on the training split.

    `features` is the model's input, in order. For `forecast` the targets come first (their own
    past is always an input), then the covariates.
    """

    features: tuple[str, ...]
    targets: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    input_scaling: Scaling = field(default_factory=lambda: Scaling((), ()))
    target_scaling: Scaling | None = None
    time_col: str | None = None
    id_col: str | None = None
    label_col: str | None = None
    sample_period: float | None = None
    time_unit: str | None = None  # "s" when the time column held dates; else its own unit

    def __post_init__(self) -> None:
        _require(
            len(self.input_scaling.mean) == len(self.features),
            f"input scaling has {len(self.input_scaling.mean)} columns for "
            f"{len(self.features)} features",
        )
        if self.target_scaling is not None:
            _require(
                len(self.target_scaling.mean) == len(self.targets),
                f"target scaling has {len(self.target_scaling.mean)} columns for "
                f"{len(self.targets)} targets",
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> DataSpec:
        raw = _from_mapping(cls, data, "data spec")
        for key in ("features", "targets", "labels"):
            raw[key] = tuple(str(v) for v in raw.get(key, ()))
        raw["input_scaling"] = Scaling.from_dict(raw.get("input_scaling"))
        if raw.get("target_scaling") is not None:
            raw["target_scaling"] = Scaling.from_dict(raw["target_scaling"])
        return cls(**raw)
