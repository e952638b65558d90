"""The load generator of `edgeseq loadtest`: a user's view of `edgeseq serve`, from another process.

One concept per module, in the order a run uses them:
- wire_lines: JSON lines encoded before the clock starts, and answers counted without parsing;
- children: the daemon (and every other helper) as child processes, waited for by their logs;
- nullserver: a server that answers without computing, to measure this generator's own ceiling;
- tcp_workload: many streams pipelined over a few connections, and one stream in a closed loop;
- stdio_workload: the daemon reading stdin and answering on stdout;
- broker, mqtt_workload: a Mosquitto broker started here, Mosquitto's own C clients the fleet;
- poolrate: the runtime's own pool rate, in a short-lived process of its own;
- neighbours: other processes mapping Numba's LLVM, which inflate the daemon's memory reading;
- figures, section: what was measured, the targets judged from it, the markdown section;
- run: all of it, in order, for `edgeseq loadtest`.

Nothing here imports numba, llvmlite or edgeseq.runtime (poolrate does, only in its own child
process): a process that maps Numba's LLVM shares those pages with the daemon, which then cannot
page them out, and the daemon's memory would read some 35 MiB heavier than it runs alone.
"""
