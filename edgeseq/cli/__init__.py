"""The `edgeseq` command: thin typer commands over the stages (app: the app and the training,
export and runtime commands; serve: serve, loadtest, bundle and devices; demo; inspection)."""
