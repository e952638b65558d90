"""`python -m edgeseq` is the `edgeseq` command."""

from edgeseq.cli.app import run

run()
