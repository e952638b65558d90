"""The streaming inference daemon behind `edgeseq serve` (see service.Daemon)."""
