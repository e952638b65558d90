"""`edgeseq loadtest`'s public names, kept where `edgeseq bench` and older callers import them;
the load generator itself is the package edgeseq.loadgen."""

from __future__ import annotations

from edgeseq.loadgen.report import LOAD_HEADING, keep_load_section, markdown, write_section
from edgeseq.loadgen.run import Options, run

__all__ = ["LOAD_HEADING", "Options", "keep_load_section", "markdown", "run", "write_section"]
