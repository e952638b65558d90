"""TOML files people write (daemon configs, board profiles): read once, refused clearly."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from edgeseq.errors import UsageError


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """The table in `path`; a missing, unreadable or malformed file is a UsageError naming
    `what` it was meant to be."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what} {path} is not valid TOML: {exc}") from None
