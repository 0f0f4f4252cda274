"""Randomness for differential privacy: a cryptographically secure stream, or a seeded one
for tests.

DP noise and DP sampling must be unpredictable to whoever sees the result: a generator
seeded with a few bytes (Mersenne Twister, PCG) can be reconstructed from its output and
the noise subtracted. Opacus's answer is torchcsprng, which no longer installs with current
torch; ours is the AES-256-CTR keystream (the `cryptography` library, the same primitive as
the secure-aggregation masks) keyed with 32 bytes from the OS's secure source. Uniforms
take 53 random bits; Gaussians come from Box-Muller, summed over four draws as Opacus's
secure mode does against floating-point attacks (Holohan et al., 2021); discrete Gaussians
use Canonne, Kamath and Steinke's rejection sampler, vectorised.

`SecureRandom.seeded(seed)` gives the same stream for the same seed: reproducible, and not
private. fedcore uses it only when `[privacy] secure_rng = false`, and says so loudly.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

log = logging.getLogger(__name__)

_UNIFORM_SCALE = 2.0**-53
INSECURE_WARNING = (
    "[privacy] secure_rng = false: DP noise and sampling are reproducible from the seed and "
    "give NO privacy. Use this only in tests."
)


class SecureRandom:
    """Random numbers from the AES-256-CTR keystream of a 32-byte key."""

    def __init__(self, key: bytes | None = None) -> None:
        key = os.urandom(32) if key is None else key
        if len(key) != 32:
            raise ValueError("key must be 32 bytes")
        self._stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._raw, self._zeros = bytearray(), b""  # fill_uniform32's buffers, reused

    @classmethod
    def seeded(cls, seed: int) -> SecureRandom:
        """A reproducible stream: for tests only (see INSECURE_WARNING)."""
        return cls(hashlib.sha256(f"fedcore-insecure-dp:{seed}".encode()).digest())

    def _words(self, count: int) -> np.ndarray:
        """`count` 64-bit words of keystream (CTR over zeros: the keystream itself)."""
        out = bytearray(8 * count + 15)  # update_into wants room for a block of slack
        self._stream.update_into(bytes(8 * count), out)
        return np.frombuffer(out, dtype="<u8", count=count).astype(np.uint64, copy=False)

    def fill_uniform32(self, out: np.ndarray) -> None:
        """out[:] (float64) = uniforms in [0, 1) with 32 random bits each: half the keystream
        of `uniform`, enough for stochastic rounding."""
        nbytes = 4 * out.size
        if len(self._zeros) < nbytes:
            self._zeros = bytes(nbytes)
            self._raw = bytearray(nbytes + 15)  # update_into wants room for a block of slack
        self._stream.update_into(memoryview(self._zeros)[:nbytes], self._raw)
        np.copyto(out, np.frombuffer(self._raw, dtype="<u4", count=out.size))
        out *= 2.0**-32

    def uniform(self, count: int) -> np.ndarray:
        """`count` floats uniform in (0, 1): 53 random bits each, never exactly 0."""
        words = self._words(count)
        words >>= np.uint64(11)
        out = words.astype(np.float64)
        out += 0.5
        out *= _UNIFORM_SCALE
        return out

    def normal(self, count: int) -> np.ndarray:
        """`count` standard normal floats (Box-Muller, in float64; torch's vectorised sin and
        cos are several times faster than numpy's here)."""
        return self._normal(count).numpy()

    def _normal(self, count: int) -> torch.Tensor:
        pairs = (count + 1) // 2
        u = torch.from_numpy(self.uniform(2 * pairs))
        radius = u[:pairs].log_().mul_(-2.0).sqrt_()
        angle = u[pairs:].mul_(2.0 * math.pi)
        out = torch.empty(2 * pairs, dtype=torch.float64)
        torch.cos(angle, out=out[:pairs])
        torch.sin(angle, out=out[pairs:])
        out[:pairs].mul_(radius)
        out[pairs:].mul_(radius)
        return out[:count]

    def gaussian(self, count: int, std: float) -> np.ndarray:
        """`count` draws of N(0, std^2), each the scaled sum of four normals: no single
        floating-point draw is exposed."""
        return self.gaussian_tensor(count, std).numpy()

    def gaussian_tensor(self, count: int, std: float) -> torch.Tensor:
        """`gaussian` as a float64 tensor (what DP-SGD adds to gradients)."""
        if std == 0:
            return torch.zeros(count, dtype=torch.float64)
        return self._normal(4 * count).view(4, count).sum(dim=0).mul_(std / 2.0)

    def bernoulli(self, count: int, p: float) -> np.ndarray:
        """`count` booleans, each True with probability p (Poisson sampling)."""
        return self.uniform(count) < p

    def discrete_gaussian(self, count: int, sigma: float) -> np.ndarray:
        """`count` integers from the discrete Gaussian N_Z(0, sigma^2): P(x) proportional to
        exp(-x^2 / (2 sigma^2)). Rejection from a discrete Laplace of scale t = floor(sigma)+1
        (Canonne, Kamath, Steinke 2020, Algorithm 3), in floating point."""
        if sigma <= 0:
            return np.zeros(count, dtype=np.int64)
        if not sigma <= 2.0**40:  # beyond, float draws lose the low bits (and int64 overflows)
            raise ValueError(f"a discrete Gaussian of sigma {sigma:.3g} is beyond this sampler's exact range")
        t = math.floor(sigma) + 1
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            want = max(2 * (count - filled), 64)
            y = self._discrete_laplace(want, t)
            accept = self.uniform(want) < np.exp(-((np.abs(y) - sigma**2 / t) ** 2) / (2 * sigma**2))
            kept = y[accept][: count - filled]
            out[filled : filled + len(kept)] = kept
            filled += len(kept)
        return out

    def _discrete_laplace(self, count: int, t: int) -> np.ndarray:
        """P(y) proportional to exp(-|y| / t): a geometric magnitude and a sign, with -0 rejected."""
        out = np.empty(count, dtype=np.int64)
        filled = 0
        log_keep = -1.0 / t  # log of the geometric's continuation probability exp(-1/t)
        while filled < count:
            want = 2 * (count - filled) + 16
            magnitude = np.floor(np.log(self.uniform(want)) / log_keep).astype(np.int64)
            negative = self.bernoulli(want, 0.5)
            ok = ~(negative & (magnitude == 0))
            signed = np.where(negative, -magnitude, magnitude)[ok][: count - filled]
            out[filled : filled + len(signed)] = signed
            filled += len(signed)
        return out


def dp_random(*, secure: bool, seed: int) -> SecureRandom:
    """The OS-keyed stream, or (secure=False, tests only) one derived from `seed`."""
    global _warned
    if secure:
        return SecureRandom()
    if not _warned:  # once per process: loud, not flooding
        log.warning(INSECURE_WARNING)
        _warned = True
    return SecureRandom.seeded(seed)


_warned = False
