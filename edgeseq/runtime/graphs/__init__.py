"""Reading ONNX: an untrusted file to a checked graph that NumPy can evaluate.

- reading: the file itself (size limits, decoding, external data confined to its folder);
- graph: the graph as edgeseq sees it, evaluated node by node (the reference for every plan);
- inputs: what the inputs are (x's layout, dtypes, sizes) and which are recurrent state;
- recurrent_ops, elementwise: NumPy implementations of the accepted ONNX operators;
- stepper: streaming a graph that has no fused plan, one sample at a time.
"""
