"""Planning: a checked graph to the fused program the kernels run, proven equal to the graph.

- plan: graph -> Plan (the chain of layers, weights repacked and aligned for the kernels);
- int8_weights: where and how a graph's weights are int8;
- specialize: a plan written out as Numba source with every size a literal: the model's own
  kernel (compiled once, cached);
- verify: the proof (plan against graph on random inputs) before a plan is used.
"""
