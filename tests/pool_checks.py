"""A check several test files share: a pool's answers are its streams' answers, to a few
float32 ulps where the pool runs the model's own kernel (its pool kernel inlines the step, and
fast-math may compile the inlined copy a little differently: which one depends on what the
Numba cache held when it was compiled), and to float32 rounding where it runs BLAS."""

from __future__ import annotations

import numpy as np

from edgeseq.runtime import Model

# The model's own kernel serially and in parallel: the stream's step, inlined.
OWN_KERNEL_SIZES = (1, 64)
ULPS = 1e-6  # relative: a few float32 ulps
# From 512 streams per call (engines.GEMM_BATCH_CACHED) BLAS matrix products over the batch:
# the sums run in another order, so the answers agree to float32 rounding (README, gemm.py).
BLAS_SIZE = 600


def assert_pools_step_as_separate_streams(model: Model, seed: int, steps: int = 3) -> None:
    rng = np.random.default_rng(seed)
    for size in (*OWN_KERNEL_SIZES, BLAS_SIZE):
        pool, ids = model.pool(size), [f"s{i}" for i in range(size)]
        streams = [model.stream() for _ in range(size)]
        for _ in range(steps):
            xs = (rng.standard_normal((size, model.n_features)) * 2).astype(np.float32)
            alone = np.stack([s.step(x) for s, x in zip(streams, xs, strict=True)])
            pooled = pool.step(ids, xs)
            if size == BLAS_SIZE:
                np.testing.assert_allclose(pooled, alone, rtol=1e-5, atol=1e-5)
            else:
                np.testing.assert_allclose(pooled, alone, rtol=ULPS, atol=ULPS)
