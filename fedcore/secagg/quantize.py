"""Fixed-point quantization for secure aggregation: real vectors <-> integers modulo 2**bits.

A value x becomes the integer round(x / step), rounded stochastically (up with probability
equal to the fractional part, so the expectation is exact), stored in two's complement
modulo 2**bits. Sums of such integers modulo 2**bits, which is what SecAgg+ computes, equal
the plain integer sums as long as the true sum stays within +-2**(bits-1) steps; `step_for`
picks the step so that it does, for a bound on the sum's magnitude. Dequantizing the secure
sum therefore gives exactly the sum of the dequantized inputs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

UInt = npt.NDArray[np.unsignedinteger[Any]]


def step_for(max_abs_sum: float, *, bits: int) -> float:
    """The finest step at which a sum of magnitude up to `max_abs_sum` cannot wrap around
    (one bit of headroom for rounding)."""
    if not max_abs_sum > 0:
        raise ValueError("max_abs_sum must be positive")
    return math.ldexp(float(max_abs_sum), -(bits - 2))


def quantize(values: np.ndarray, *, step: float, bits: int, rng: np.random.Generator) -> UInt:
    """Integers modulo 2**bits (uint32 or uint64) for `values`, stochastically rounded."""
    if bits not in (32, 64):
        raise ValueError("bits must be 32 or 64")
    scaled = np.divide(values, step, dtype=np.float64)
    bound = math.ldexp(1.0, bits - 2)
    if not (-bound <= scaled.min(initial=0.0) and scaled.max(initial=0.0) <= bound):  # NaN fails too
        raise ValueError("values are not finite or exceed the quantization range; clip them first")
    # floor(x + u), u uniform in [0, 1), is floor(x) + 1 with probability frac(x): stochastic
    # rounding in place, in three passes (float32 uniforms: a bias of 2**-24 at most).
    scaled += rng.random(scaled.shape, dtype=np.float32)
    np.floor(scaled, out=scaled)
    # |values| <= 2**(bits - 2): the signed cast is exact, and its two's complement bits are
    # the value modulo 2**bits, as the secure sum needs.
    out: UInt = (
        scaled.astype(np.int64).view(np.uint64) if bits == 64 else scaled.astype(np.int32).view(np.uint32)
    )
    return out


def signed(total: UInt) -> npt.NDArray[np.int64]:
    """Integers modulo 2**bits read as two's complement."""
    if total.dtype == np.uint64:
        return total.view(np.int64)
    as_int = total.astype(np.int64)
    return np.where(as_int >= 1 << 31, as_int - (1 << 32), as_int)


def dequantize(total: UInt, *, step: float) -> npt.NDArray[np.float64]:
    """Real values from (a sum of) quantized integers."""
    return signed(total).astype(np.float64) * step


def clip(values: np.ndarray, bound: float) -> np.ndarray:
    """Each value clipped to [-bound, bound] (the quantizer's range contract)."""
    return np.asarray(np.clip(values, -bound, bound))
