"""The `edgeseq` command: thin typer commands over the stages, each importing its stage only
when it runs (so `edgeseq --help` imports no torch).

- app: the typer app, its error boundary, and the training, export, runtime and bench commands;
- serve: `edgeseq serve` (the daemon); loadtest: `edgeseq loadtest`; deploy: `edgeseq devices`,
  `edgeseq bundle`; demo: `make demo`; inspection: `edgeseq inspect`.
"""
