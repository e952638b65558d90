"""Vectorizable float32 tanh and sigmoid for the kernels (no libm calls in the hot loop).

pip's Numba has no SVML and ARM has none at all, so `np.tanh` in a loop is a scalar libm call per
element. This is Eigen's rational approximation of tanh (`generic_fast_tanh_float`): odd
polynomial of degree 13 over even of degree 6, clamped where float32 tanh is already +-1. Its
error stays within a few float32 ulps; sigmoid(x) = 0.5 + 0.5 tanh(x / 2).
"""

from __future__ import annotations

import numpy as np
from numba import njit

CLAMP = np.float32(7.90531110763549805)
A1 = np.float32(4.89352455891786e-03)
A3 = np.float32(6.37261928875436e-04)
A5 = np.float32(1.48572235717979e-05)
A7 = np.float32(5.12229709037114e-08)
A9 = np.float32(-8.60467152213735e-11)
A11 = np.float32(2.00018790482477e-13)
A13 = np.float32(-2.76076847742355e-16)
B0 = np.float32(4.89352518554385e-03)
B2 = np.float32(2.26843463243900e-03)
B4 = np.float32(1.18534705686654e-04)
B6 = np.float32(1.19825839466702e-06)
HALF = np.float32(0.5)


# Every fast-math flag but "no NaNs/infinities" (the kernels' input checks must see a NaN), and
# NumPy's error model (Python's checks every float division for zero, which stops vectorising).
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
inline_kernel = njit(cache=True, inline="always", fastmath=FASTMATH, error_model="numpy")


@inline_kernel
def tanh(x: np.float32) -> np.float32:
    x = min(max(x, -CLAMP), CLAMP)
    x2 = x * x
    p = x2 * A13 + A11
    p = x2 * p + A9
    p = x2 * p + A7
    p = x2 * p + A5
    p = x2 * p + A3
    p = x2 * p + A1
    p = x * p
    q = x2 * B6 + B4
    q = x2 * q + B2
    q = x2 * q + B0
    return p / q


@inline_kernel
def sigmoid(x: np.float32) -> np.float32:
    return HALF + HALF * tanh(HALF * x)
