"""Benchmarks: `edgeseq bench`, `edgeseq loadtest` and BENCHMARKS.md.

- measure: step, feed, pools, start-up and memory of every backend, as ratios;
- models_table: every reference model in one table (plan, speed, resident weights);
- report: BENCHMARKS.md from measured figures, each target judged;
- loadgen: the load generator of `edgeseq loadtest`, a separate process from the daemon.
"""
