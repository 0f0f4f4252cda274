"""t-of-n Shamir secret sharing of byte strings over GF(2**521 - 1), pure Python integers.

A secret of at most 64 bytes is read as a big-endian integer ``s < 2**512 < p`` with
``p = 2**521 - 1`` (a Mersenne prime). ``split`` draws a random polynomial
``f(x) = s + a_1 x + ... + a_{t-1} x^{t-1}`` over GF(p) and hands out ``(x, f(x))`` for
``x = 1..n``; ``combine`` recovers ``s = f(0)`` by Lagrange interpolation from any ``t`` shares.

Security: the coefficients are uniform in GF(p) (72 random bytes reduced modulo p: statistical
distance below 2**-55), and for any ``t - 1`` evaluation points the map from coefficients to
their ``y`` values is a bijection for every secret. So any ``t - 1`` shares are uniformly
distributed whatever the secret: fewer than ``t`` shares reveal nothing about it,
information-theoretically.

Not verifiable: nothing proves that a share is the one the dealer made. A share holder who
sends a wrong ``y`` silently changes the reconstructed value (``combine`` can only reject a
result that does not fit in ``length`` bytes). Protection against such behaviour belongs to
the SecAgg+ protocol layer (its semi-honest/malicious threat model, consistency checks and
signatures), not to this module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

__all__ = ["MAX_SECRET_BYTES", "PRIME", "SHARE_BYTES", "Share", "combine", "split"]

PRIME: Final = 2**521 - 1
"""The field's modulus, a Mersenne prime."""
SHARE_BYTES: Final = 66
"""Width of an encoded field element (521 bits), big-endian."""
MAX_SECRET_BYTES: Final = 64
_COEFFICIENT_BYTES: Final = 72
"""Random bytes per coefficient: 576 bits reduced modulo a 521-bit prime."""


@dataclass(frozen=True)
class Share:
    """One share: the evaluation point ``x`` (1..n) and ``f(x)`` as 66 big-endian bytes."""

    x: int
    y: bytes = field(repr=False)  # secret material: keep it out of logs and tracebacks


def _check_counts(*, shares: int, threshold: int) -> None:
    if not 1 <= threshold <= shares < PRIME:
        raise ValueError(
            f"need 1 <= threshold <= shares < 2**521 - 1, got threshold={threshold}, shares={shares}"
        )


def split(
    secret: bytes,
    *,
    shares: int,
    threshold: int,
    randbytes: Callable[[int], bytes] = os.urandom,
) -> list[Share]:
    """``shares`` Shamir shares of ``secret`` (at most 64 bytes), any ``threshold`` of which recover it.

    ``randbytes(n)`` must return ``n`` bytes from a cryptographically secure source; it is
    injectable for tests only. It is called ``threshold - 1`` times, for 72 bytes each.
    """
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"secret must be at most {MAX_SECRET_BYTES} bytes, got {len(secret)}")
    _check_counts(shares=shares, threshold=threshold)
    coefficients = [int.from_bytes(secret, "big")]
    for _ in range(threshold - 1):
        draw = randbytes(_COEFFICIENT_BYTES)
        if len(draw) != _COEFFICIENT_BYTES:
            raise ValueError(f"randbytes returned {len(draw)} bytes, expected {_COEFFICIENT_BYTES}")
        coefficients.append(int.from_bytes(draw, "big") % PRIME)
    result = []
    for x in range(1, shares + 1):
        y = 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % PRIME
        result.append(Share(x=x, y=y.to_bytes(SHARE_BYTES, "big")))
    return result


def _decode(share: Share) -> tuple[int, int]:
    if not 1 <= share.x < PRIME:
        raise ValueError(f"share x={share.x} is out of range 1..2**521 - 2")
    if len(share.y) != SHARE_BYTES:
        raise ValueError(f"share x={share.x}: y must be {SHARE_BYTES} bytes, got {len(share.y)}")
    y = int.from_bytes(share.y, "big")
    if y >= PRIME:
        raise ValueError(f"share x={share.x}: y is not an element of GF(2**521 - 1)")
    return share.x, y


def combine(shares: Sequence[Share], *, threshold: int, length: int) -> bytes:
    """The ``length``-byte secret from at least ``threshold`` shares (the first ``threshold`` are used).

    Every share given is validated. Raises ``ValueError`` for fewer than ``threshold`` shares,
    a repeated ``x``, an ``x`` outside 1..p-1, a ``y`` that is not a 66-byte field element, or
    a result that does not fit in ``length`` bytes (shares of another secret, or a lying
    share holder; most lies go undetected, see the module docstring).
    """
    if not 0 <= length <= MAX_SECRET_BYTES:
        raise ValueError(f"length must be within 0..{MAX_SECRET_BYTES}, got {length}")
    if threshold < 1:
        raise ValueError(f"threshold must be at least 1, got {threshold}")
    if len(shares) < threshold:
        raise ValueError(f"need {threshold} shares to recover the secret, got {len(shares)}")
    points = [_decode(share) for share in shares]
    xs = [x for x, _ in points]
    if len(set(xs)) != len(xs):
        raise ValueError("shares with a repeated x")
    points = points[:threshold]
    secret = 0
    for i, (x_i, y_i) in enumerate(points):
        # Lagrange basis polynomial i at 0: prod_{j != i} x_j / (x_j - x_i).
        numerator, denominator = 1, 1
        for j, (x_j, _) in enumerate(points):
            if j != i:
                numerator = numerator * x_j % PRIME
                denominator = denominator * (x_j - x_i) % PRIME
        secret = (secret + y_i * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 256**length:
        raise ValueError(f"the shares do not encode a {length}-byte secret")
    return secret.to_bytes(length, "big")
