"""The randomized Hadamard rotation of distributed DP's modular secure sum (Kairouz, Liu,
Steinke, ICML 2021): x -> H D x / sqrt(n), D a diagonal of public random signs, H the n x n
Walsh-Hadamard matrix, x zero-padded to n, a power of two. The rotation is orthogonal, so it
keeps every L2 norm (the sensitivity, hence the privacy, does not depend on it); what it
buys is flatness: each rotated coordinate of a vector of norm c is about c / sqrt(n), not up
to c, so a sum wraps modulo 2**bits only if the noise does, and 16 to 20 bits suffice where
the plain integers need 64. The signs are public (both ends draw them from the round's seed):
the privacy holds for any signs, a bad draw costs only accuracy."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]


def padded(dimension: int) -> int:
    """The rotated length: the smallest power of two at least `dimension`."""
    return 1 << max(dimension - 1, 0).bit_length()


def flatness(length: int, failure: float) -> float:
    """beta with P(|<u, s>| > beta ||u|| / sqrt(length)) <= failure / length for random signs s
    (Hoeffding): every coordinate of a rotated vector is within beta / sqrt(length) of its
    norm, except with probability `failure` in all (a union bound)."""
    return math.sqrt(2 * math.log(2 * length / failure))


def _signs(seed: int, length: int) -> Floats:
    """+-1 from SHAKE-256 of the seed: the same at every site and the server whatever their
    numpy (whose generators promise no stream across versions)."""
    stream = hashlib.shake_256(b"fedcore rotation|" + seed.to_bytes(8, "little")).digest((length + 7) // 8)
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8), bitorder="little")[:length]
    return np.asarray(1.0 - 2.0 * bits, dtype=np.float64)


def _hadamard(x: Floats) -> Floats:
    """H x / sqrt(len(x)), in place (the fast Walsh-Hadamard transform, n log n additions)."""
    n, h = x.size, 1
    while h < n:
        pairs = x.reshape(-1, 2, h)
        first = pairs[:, 0, :].copy()
        pairs[:, 0, :] += pairs[:, 1, :]
        np.subtract(first, pairs[:, 1, :], out=pairs[:, 1, :])
        h *= 2
    x *= 1.0 / math.sqrt(n)
    return x


def rotate(values: npt.ArrayLike, seed: int) -> Floats:
    """H D [values, 0...] / sqrt(n): `padded(len(values))` coordinates."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    n = padded(flat.size)
    x = np.zeros(n)
    x[: flat.size] = flat
    x *= _signs(seed, n)
    return _hadamard(x)


def unrotate(rotated: npt.ArrayLike, seed: int, dimension: int) -> Floats:
    """The inverse of `rotate` (D H / sqrt(n): H is symmetric and H H = n I), cut to `dimension`."""
    x = np.array(rotated, dtype=np.float64)
    if x.size != padded(dimension):
        raise ValueError(f"a rotation of {dimension} values has {padded(dimension)}, got {x.size}")
    _hadamard(x)
    x *= _signs(seed, x.size)
    return x[:dimension]
