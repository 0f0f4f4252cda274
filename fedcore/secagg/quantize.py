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
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedcore.privacy.randomness import SecureRandom

UInt = npt.NDArray[np.unsignedinteger[Any]]


def step_for(max_abs_sum: float, *, bits: int) -> float:
    """The finest step at which a sum of magnitude up to `max_abs_sum` cannot wrap around
    (one bit of headroom for rounding)."""
    if not max_abs_sum > 0:
        raise ValueError("max_abs_sum must be positive")
    return math.ldexp(float(max_abs_sum), -(bits - 2))


_PIECE: Final = 1 << 16  # values quantized at a time: the float64 scratch (512 KB) stays in cache


def quantize(values: np.ndarray, *, step: float, bits: int, rng: SecureRandom) -> UInt:
    """Integers modulo 2**bits (uint32 or uint64) for `values`, stochastically rounded."""
    if bits not in (32, 64):
        raise ValueError("bits must be 32 or 64")
    out: UInt = np.empty(np.size(values), dtype=np.uint32 if bits == 32 else np.uint64)
    quantize_into(out, np.ravel(values), scale=1.0 / step, rng=rng)
    return out


def quantize_into(
    out: UInt, values: np.ndarray, *, scale: float, rng: SecureRandom, clip: float | None = None
) -> None:
    """out[:] = the stochastic rounding of clip(values) x scale, modulo 2**bits (out's dtype,
    uint32 or uint64), piece by piece so that no temporary leaves the cache."""
    bits = out.itemsize * 8
    target = out.view(np.int32 if bits == 32 else np.int64)
    bound = math.ldexp(1.0, bits - 2)
    if clip is not None and not abs(clip * scale) <= bound:
        raise ValueError("the clipping range exceeds the quantization range")
    width = min(_PIECE, values.size)
    scratch, uniforms = np.empty(width), np.empty(width)
    for start in range(0, values.size, _PIECE):
        piece = values[start : start + _PIECE]
        x, u = scratch[: piece.size], uniforms[: piece.size]
        if clip is None:
            x[...] = piece
            x *= scale
            in_range = -bound <= x.min() and x.max() <= bound  # NaN fails too
        else:
            np.clip(piece, -clip, clip, out=x)
            x *= scale
            in_range = not math.isnan(np.add.reduce(x))  # clipped: only NaN can be wrong
        if not in_range:
            raise ValueError("values are not finite or exceed the quantization range; clip them first")
        # floor(x + u), u uniform in [0, 1), is floor(x) + 1 with probability frac(x):
        # stochastic rounding (32-bit uniforms: a bias of 2**-32 at most).
        rng.fill_uniform32(u)
        x += u
        np.floor(x, out=x)
        # |x| <= 2**(bits - 2): the signed cast is exact, and its two's complement bits are
        # the value modulo 2**bits, as the secure sum needs.
        target[start : start + piece.size] = x


def signed(total: UInt) -> npt.NDArray[np.int64]:
    """Integers modulo 2**bits read as two's complement."""
    if total.dtype == np.uint64:
        return total.view(np.int64)
    return total.view(np.int32).astype(np.int64)


def dequantize(total: UInt, *, step: float) -> npt.NDArray[np.float64]:
    """Real values from (a sum of) quantized integers."""
    out = total.view(np.int64 if total.dtype == np.uint64 else np.int32).astype(np.float64)
    out *= step
    return out


def clip(values: np.ndarray, bound: float) -> np.ndarray:
    """Each value clipped to [-bound, bound] (the quantizer's range contract)."""
    return np.asarray(np.clip(values, -bound, bound))
