"""Pools: many streams stepped in one call.

- stacked: on the numpy and onnxruntime backends, every stream's sample in one graph call;
- gemm: large pool steps as BLAS matrix products over the batch;
- blas: numpy's own OpenBLAS `sgemm`, callable from inside Numba kernels;
- lstm_shares: an LSTM layer of a large pool step, one share of the streams per thread.
"""
