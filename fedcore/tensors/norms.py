"""L2 norms and clipping of named arrays taken as one vector: the one clipping every stage uses.

A clipped update must be within its bound *after* it is rounded to its own dtype: the
noise of a DP stage is sized for that bound, so even a rounding overrun (float32 values of
1e35 clipped to 1e-6 came out at 1.000001e-6) is a sensitivity overrun.
"""

from __future__ import annotations

import math

import numpy as np

from fedcore.tensors.codec import Arrays

_MAX_SHRINKS = 64  # each shrink takes off one unit of the dtype's precision; then give up to zeros


def l2_norm(arrays: Arrays) -> float:
    """The L2 norm of all values together, summed in float64."""
    return math.sqrt(sum(float(np.square(a, dtype=np.float64).sum()) for a in arrays.values()))


def clip_l2(arrays: Arrays, bound: float) -> tuple[Arrays, bool]:
    """`arrays` scaled as one vector to L2 norm at most `bound` (in their own dtypes), and
    whether they already were (then they are returned as they are)."""
    if not bound > 0:
        raise ValueError(f"the clipping bound must be positive, got {bound}")
    norm = l2_norm(arrays)
    if norm <= bound:
        return arrays, True
    eps = max((float(np.finfo(a.dtype).eps) for a in arrays.values() if a.dtype.kind == "f"), default=0.0)
    factor = bound / norm
    for _ in range(_MAX_SHRINKS):
        clipped = {k: (np.asarray(a, dtype=np.float64) * factor).astype(a.dtype) for k, a in arrays.items()}
        if l2_norm(clipped) <= bound:
            return clipped, False
        factor *= 1 - max(eps, 2**-52)  # rounding went up: shrink by one unit of precision
    return {k: np.zeros_like(a) for k, a in arrays.items()}, False  # subnormal dust: nothing is safe
