"""What a kernel call returns besides its outputs, for the kernels and everything that calls them.

`step` and `feed` kernels return the flat index of the first NaN or infinity in their input
(and then change nothing), BAD_OUTPUT when finite input drove the state or an output to NaN or
infinity (the state is then as it was before the call), SHAPE_MISMATCH (a model's own kernel
given arrays of another length), or -1.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SHAPE_MISMATCH = -2  # a specialized kernel's answer to arrays of the wrong length
BAD_OUTPUT = -3  # finite samples drove the state or an output to NaN or infinity: rolled back
Kernel = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], int]  # params, x, work, out
