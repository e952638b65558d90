"""edgeseq's version, as installed (a module of its own: the runtime's kernel cache keys on it,
and importing it must not import the package's public names)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgeseq")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"
