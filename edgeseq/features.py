"""Samples given by feature name ({"pressure": 2.5, ...}): the one mapping of names to a model's
feature order, for `Stream.step` (runtime) and `"x"` on the wire (daemon protocol).

A module of the root contract, importing nothing but errors: the wire's parser stays free of
the runtime (numba), and both callers refuse the same mistakes with the same words.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from edgeseq.errors import ShapeError


def by_name(
    sample: Mapping[Any, Any], names: Sequence[str], what: str = "sample",
    show: Callable[[Any], str] = repr,
) -> list[Any]:  # fmt: skip
    """The sample's values in the order of `names`; ShapeError naming what is missing or
    unknown, and what the model takes. `show` prints an unknown key (the wire's keys are
    untrusted: it shortens them)."""
    try:
        values = [sample[name] for name in names]
    except KeyError:
        missing = [name for name in names if name not in sample]
        raise ShapeError(f"{what} has no {', '.join(map(repr, missing))}; the model takes "
                         f"{', '.join(map(repr, names))}") from None  # fmt: skip
    if len(sample) != len(names):
        unknown = [show(key) for key in sample if key not in names]
        raise ShapeError(f"{what} names {', '.join(unknown)}, which the model does not take; "
                         f"it takes {', '.join(map(repr, names))}")  # fmt: skip
    return values
