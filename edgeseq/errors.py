"""One small hierarchy of errors: each says what was wrong, where, and what was expected.

The CLI catches `EdgeseqError` once and turns it into `error: ...` and an exit code; nothing
below the CLI prints or exits.
"""

from __future__ import annotations


class EdgeseqError(Exception):
    """Base of every error edgeseq raises on purpose."""

    exit_code = 1


class UsageError(EdgeseqError):
    """The user asked for something that cannot work (bad option value, bad combination)."""

    exit_code = 2


class DataError(UsageError):
    """Input data is unusable: missing column, non-numeric cell, gap, too short, empty file."""


class ShapeError(UsageError):
    """An array has the wrong shape or dtype for the model."""


class ModelFormatError(UsageError):
    """A model or checkpoint file is corrupt, unsupported or not what it claims to be."""


class CheckpointError(ModelFormatError):
    """A training checkpoint or state snapshot cannot be read or does not match."""
