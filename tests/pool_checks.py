"""A check several test files share: a pool's answers are its streams' answers, bit for bit."""

from __future__ import annotations

import numpy as np

from edgeseq.runtime import Model

POOL_SIZES = (1, 64, 600)  # the model's own kernel serially, in parallel, and at a BLAS size


def assert_pools_step_as_separate_streams(model: Model, seed: int, steps: int = 3) -> None:
    rng = np.random.default_rng(seed)
    for size in POOL_SIZES:
        pool, ids = model.pool(size), [f"s{i}" for i in range(size)]
        streams = [model.stream() for _ in range(size)]
        for _ in range(steps):
            xs = rng.standard_normal((size, model.n_features)).astype(np.float32)
            alone = np.stack([s.step(x) for s, x in zip(streams, xs, strict=True)])
            np.testing.assert_array_equal(pool.step(ids, xs), alone)
