"""ModelSpec and DataSpec: the contract that training, export, the runtime and the daemon share.

Both travel inside every checkpoint and every exported artifact as plain JSON (the
artifact describes itself), so they are validated whenever they are read back. Each field names
its rule (a `Check`) once, next to its type: `from_dict` applies the rules to untrusted JSON and
reports the key path of the first bad value; `__post_init__` applies them to values built in code.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any, NoReturn

from edgeseq.errors import ModelFormatError

CELLS = ("rnn", "lstm", "gru")
TASKS = ("forecast", "classify", "regress", "seq2seq", "generate")
NONLINEARITIES = ("tanh", "relu")
FORMAT_VERSION = 1
MAX_SIZE = 1_000_000  # the most units, layers, steps, outputs or columns a spec may declare

Check = Callable[[Any, str], Any]
"""Validates the value found at a key path (e.g. `data_spec.input_scaling.mean[2]`) and returns it
in the field's own type (JSON arrays become tuples); raises ModelFormatError naming the path."""

JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
              tuple: "array", dict: "object", type(None): "null"}  # fmt: skip
_SHOW = reprlib.Repr()
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong = 40, 40, 40


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ModelFormatError(what)


def refuse(where: str, expected: str, value: Any) -> NoReturn:
    """Raise the error for a bad value: its key path, what was expected, what was found."""
    if value is None or isinstance(value, bool):
        found = json.dumps(value)  # null, true, false
    else:
        found = f"{JSON_TYPES.get(type(value), type(value).__name__)} {_SHOW.repr(value)}"
    raise ModelFormatError(f"{where} must be {expected}, found {found}")


def integer(lo: int, hi: int) -> Check:
    def check(value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            refuse(where, f"an integer in {lo}..{hi}", value)
        return value

    return check


def number(expected: str = "a finite number", ok: Callable[[float], bool] = math.isfinite) -> Check:
    """A finite JSON number (not a boolean) for which `ok` holds; `expected` says which."""

    def check(value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            refuse(where, expected, value)
        try:
            x = float(value)
        except OverflowError:  # an integer past float range, such as 10**400
            refuse(where, expected, value)
        if not (math.isfinite(x) and ok(x)):
            refuse(where, expected, value)
        return x

    return check


def text(choices: Sequence[str] = ()) -> Check:
    """A string, one of `choices` when given."""

    def check(value: Any, where: str) -> str:
        if not isinstance(value, str) or (choices and value not in choices):
            refuse(where, f"one of {', '.join(choices)}" if choices else "a string", value)
        return value

    return check


def array_of(item: Check, expected: str) -> Check:
    """A JSON array of at most MAX_SIZE items, each passing `item`; returned as a tuple."""

    def check(value: Any, where: str) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple) or len(value) > MAX_SIZE:
            refuse(where, f"an array of at most {MAX_SIZE} {expected}", value)
        return tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))

    return check


def optional(check: Check) -> Check:
    """null, or a value passing `check`."""
    return lambda value, where: None if value is None else check(value, where)


def record(cls: Any) -> Check:
    """An object read by `cls.from_dict` (or, in code, an instance of `cls`)."""
    return lambda value, where: value if isinstance(value, cls) else cls.from_dict(value, where)


def _is(check: Check) -> dict[str, Check]:
    return {"check": check}


def read_fields(cls: Any, data: Any, where: str) -> dict[str, Any]:
    """Check `data` is an object holding every required field of dataclass `cls` and no others,
    each passing its rule; return all fields' values, defaults filled in."""
    if not isinstance(data, dict):
        refuse(where, "an object", data)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    _require(
        not unknown,
        f"{where} has unknown keys {_SHOW.repr(unknown)}; expected some of {sorted(known)}",
    )
    values = {}
    for f in fields(cls):
        path = f"{where}.{f.name}"
        if f.name in data:
            values[f.name] = f.metadata["check"](data[f.name], path)
        elif f.default is not MISSING:
            values[f.name] = f.default
        elif f.default_factory is not MISSING:
            values[f.name] = f.default_factory()
        else:
            required = [g.name for g in fields(cls) if _required(g)]
            raise ModelFormatError(f"{path} is missing; {where} requires {', '.join(required)}")
    return values


def _required(f: Field[Any]) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _check_fields(obj: Any) -> dict[str, Any]:
    """Apply each field's rule to a dataclass built in code; return its fields' values."""
    values = {f.name: getattr(obj, f.name) for f in fields(obj)}
    for f in fields(obj):
        f.metadata["check"](values[f.name], f"{type(obj).__name__}.{f.name}")
    return values


SIZE = integer(1, MAX_SIZE)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network (not its weights).

    `output_size` is the width of the head at every time step: horizon * n_targets for forecast
    and seq2seq, the number of classes for classify, n_targets for regress and generate.
    """

    task: str = field(metadata=_is(text(TASKS)))
    cell: str = field(metadata=_is(text(CELLS)))
    input_size: int = field(metadata=_is(SIZE))
    hidden_size: int = field(metadata=_is(SIZE))
    num_layers: int = field(metadata=_is(SIZE))
    output_size: int = field(metadata=_is(SIZE))
    horizon: int = field(default=1, metadata=_is(SIZE))
    n_targets: int = field(default=1, metadata=_is(integer(0, MAX_SIZE)))
    nonlinearity: str = field(default="tanh", metadata=_is(text(NONLINEARITIES)))
    dropout: float = field(
        default=0.0, metadata=_is(number("a number in [0, 1)", lambda p: 0.0 <= p < 1.0))
    )

    def __post_init__(self) -> None:
        _check_fields(self)

    @property
    def has_cell_state(self) -> bool:
        return self.cell == "lstm"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "model_spec") -> ModelSpec:
        return cls(**read_fields(cls, data, where))


@dataclass(frozen=True)
class Scaling:
    """Per-column affine scaling fitted on the training split: z = (v - mean) / std."""

    mean: tuple[float, ...] = field(metadata=_is(array_of(number(), "finite numbers")))
    std: tuple[float, ...] = field(
        metadata=_is(array_of(number("a positive finite number", lambda s: s > 0), "numbers > 0"))
    )

    def __post_init__(self) -> None:
        self._agree(_check_fields(self), type(self).__name__)

    @staticmethod
    def _agree(v: dict[str, Any], where: str) -> None:
        _require(
            len(v["mean"]) == len(v["std"]),
            f"{where}.mean has {len(v['mean'])} entries and {where}.std {len(v['std'])}; "
            "expected one of each per column",
        )

    @classmethod
    def identity(cls, n: int) -> Scaling:
        return cls(mean=(0.0,) * n, std=(1.0,) * n)

    @classmethod
    def from_dict(cls, data: Any, where: str = "scaling") -> Scaling:
        values = read_fields(cls, data, where)
        cls._agree(values, where)
        return cls(**values)


TRANSFORMS = ("none", "log", "diff", "log-diff", "seasonal", "log-seasonal")
MAX_SEASON = 10_000  # the most past values a seasonal transform keeps per target and stream


@dataclass(frozen=True)
class TargetTransform:
    """What a forecasting network predicts instead of the target's level, and how the graph
    turns that back into physical units.

    `log` works on log(target) (multiplicative growth; targets must stay positive). `diff`
    feeds the network the change since the previous sample and has it predict the change from
    the last observed value: y(t+k) = v(t) + out(t, k). `seasonal` does the same against the
    value one season back: input v(t) - v(t - season), y(t+k) = v(t + k - season) + out(t, k).
    Either keeps the last `lag` values of v as recurrent state (one more state input/output pair
    beside h0/hn), primed with the first sample of a fresh stream. A level trained on a range
    saturates the network outside it; a change does not.
    """

    name: str = field(default="none", metadata=_is(text(TRANSFORMS)))
    season: int = field(default=1, metadata=_is(integer(1, MAX_SEASON)))

    def __post_init__(self) -> None:
        _check_fields(self)

    @property
    def log(self) -> bool:
        return self.name.startswith("log")

    @property
    def seasonal(self) -> bool:
        return self.name.endswith("seasonal")

    @property
    def lag(self) -> int:
        """Past values kept per target: 0 (none, log), 1 (diff) or the season."""
        if self.name.endswith("diff"):
            return 1
        return self.season if self.seasonal else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "target_transform") -> TargetTransform:
        return cls(**read_fields(cls, data, where))


NAMES = array_of(text(), "strings")


@dataclass(frozen=True)
class DataSpec:
    """What the columns mean: names, order, scaling and labels, as fitted on the training split.

    `features` is the model's input, in order. For `forecast` the targets come first (their own
    past is always an input), then the covariates.
    """

    features: tuple[str, ...] = field(metadata=_is(NAMES))
    targets: tuple[str, ...] = field(default=(), metadata=_is(NAMES))
    labels: tuple[str, ...] = field(default=(), metadata=_is(NAMES))
    input_scaling: Scaling = field(
        default_factory=lambda: Scaling((), ()), metadata=_is(record(Scaling))
    )
    target_scaling: Scaling | None = field(default=None, metadata=_is(optional(record(Scaling))))
    time_col: str | None = field(default=None, metadata=_is(optional(text())))
    id_col: str | None = field(default=None, metadata=_is(optional(text())))
    label_col: str | None = field(default=None, metadata=_is(optional(text())))
    sample_period: float | None = field(
        default=None,
        metadata=_is(optional(number("a positive finite number", lambda p: p > 0))),
    )
    # "s" when the time column held dates; else its own unit
    time_unit: str | None = field(default=None, metadata=_is(optional(text())))
    # forecast and seq2seq: what the network predicts for the targets (None: their levels)
    target_transform: TargetTransform | None = field(
        default=None, metadata=_is(optional(record(TargetTransform)))
    )
    # with a target transform, input_scaling's target columns scale what the network reads (a
    # change, say); these scale the targets' own levels (their log for log transforms), as
    # fitted on the training rows: what a sample's target columns look like
    target_levels: Scaling | None = field(default=None, metadata=_is(optional(record(Scaling))))

    def __post_init__(self) -> None:
        self._agree(_check_fields(self), type(self).__name__)

    @staticmethod
    def _agree(v: dict[str, Any], where: str) -> None:
        for scaling, columns in (("input_scaling", "features"), ("target_scaling", "targets"),
                                 ("target_levels", "targets")):  # fmt: skip
            if v[scaling] is not None:
                n = len(v[scaling].mean)
                _require(
                    n == len(v[columns]),
                    f"{where}.{scaling} has {n} columns; expected one per entry of "
                    f"{where}.{columns} ({len(v[columns])})",
                )

    def to_dict(self) -> dict[str, Any]:
        """As JSON; without a target transform its keys are left out, so a model without one
        stays readable by an edgeseq that predates them (a board not yet upgraded)."""
        values = asdict(self)
        for key in ("target_transform", "target_levels"):
            if values[key] is None:
                del values[key]
        return values

    @classmethod
    def from_dict(cls, data: Any, where: str = "data_spec") -> DataSpec:
        values = read_fields(cls, data, where)
        cls._agree(values, where)
        return cls(**values)
