"""A masked input below 32 bits on the wire: integers modulo 2**bits (16 <= bits < 32) in
ceil(length x bits / 8) bytes instead of 4 per integer. Masking and summing stay in uint32
(2**bits divides 2**32, so sums and masks modulo 2**32 reduce to the right ones modulo
2**bits); only what travels is cut to its low `bits` bits, little-endian, bit after bit."""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

MIN_BITS: Final = 16
_PIECE: Final = 1 << 15  # integers packed at a time (a multiple of 8: a whole number of bytes)


def packed(bits: int) -> bool:
    """Whether a vector modulo 2**bits travels packed (else as uint32 or uint64)."""
    return bits < 32


def packed_size(length: int, bits: int) -> int:
    return (length * bits + 7) // 8


def reduce(values: npt.NDArray[np.uint32], bits: int) -> npt.NDArray[np.uint32]:
    """values modulo 2**bits, in place."""
    if packed(bits):
        values &= np.uint32((1 << bits) - 1)
    return values


def pack(values: npt.NDArray[np.uint32], bits: int) -> npt.NDArray[np.uint8]:
    """The low `bits` bits of every value, packed."""
    if not MIN_BITS <= bits < 32 or values.dtype != np.uint32 or values.ndim != 1:
        raise ValueError(f"packing takes a 1-d uint32 vector and 16 <= bits < 32, got {bits}")
    if bits == 16:
        return values.astype("<u2").view(np.uint8)
    out = np.empty(packed_size(values.size, bits), dtype=np.uint8)
    for start in range(0, values.size, _PIECE):
        piece = values[start : start + _PIECE].astype("<u4").view(np.uint8).reshape(-1, 4)
        low = np.unpackbits(piece, axis=1, bitorder="little")[:, :bits]
        chunk = np.packbits(low, bitorder="little")
        begin = start * bits // 8
        out[begin : begin + chunk.size] = chunk
    return out


def unpack(data: npt.NDArray[np.uint8], bits: int, length: int) -> npt.NDArray[np.uint32]:
    """The `length` integers modulo 2**bits that `pack` packed into `data` (ValueError when
    its size is not theirs)."""
    if not MIN_BITS <= bits < 32 or data.dtype != np.uint8 or data.shape != (packed_size(length, bits),):
        raise ValueError(f"{length} packed {bits}-bit integers take {packed_size(length, bits)} bytes")
    if bits == 16:
        return data.view("<u2").astype(np.uint32)
    out = np.empty(length, dtype=np.uint32)
    for start in range(0, length, _PIECE):
        count = min(_PIECE, length - start)
        begin = start * bits // 8
        raw = np.unpackbits(data[begin : begin + packed_size(count, bits)], bitorder="little")
        full = np.zeros((count, 32), dtype=np.uint8)
        full[:, :bits] = raw[: count * bits].reshape(count, bits)
        out[start : start + count] = np.packbits(full, axis=1, bitorder="little").view("<u4").ravel()
    return out
