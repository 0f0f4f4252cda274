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
sends a wrong ``y`` silently changes what ``combine`` returns (it can only reject a result
that does not fit in ``length`` bytes). ``recover`` takes a check of the secret from the
caller (SecAgg+ checks a seed against its owner's commitment, a private key against its
advertised public key) and uses the shares beyond ``threshold`` to find a subset that
passes it, and the shares that do not fit.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

__all__ = ["MAX_SECRET_BYTES", "PRIME", "SHARE_BYTES", "Share", "combine", "recover", "split"]

PRIME: Final = 2**521 - 1
"""The field's modulus, a Mersenne prime."""
SHARE_BYTES: Final = 66
"""Width of an encoded field element (521 bits), big-endian."""
MAX_SECRET_BYTES: Final = 64
_COEFFICIENT_BYTES: Final = 72
"""Random bytes per coefficient: 576 bits reduced modulo a 521-bit prime."""
MAX_ATTEMPTS: Final = 1000
"""Subsets ``recover`` tries at most: liars cannot make it try exponentially many."""


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
    secret = _polynomial(points[:threshold])(0)
    if secret >= 256**length:
        raise ValueError(f"the shares do not encode a {length}-byte secret")
    return secret.to_bytes(length, "big")


def _polynomial(points: Sequence[tuple[int, int]]) -> Callable[[int], int]:
    """The polynomial through `points` (distinct x), as a function (Lagrange: basis i at
    `at` is prod_{j != i} (at - x_j) / (x_i - x_j)). The x are small integers, so the
    numerators and denominators are exact integers; the fractions go over one common
    denominator, inverted once for every evaluation, not once per point and evaluation."""
    xs = [x for x, _ in points]
    denominators = [math.prod(x_i - x_j for x_j in xs if x_j != x_i) for x_i in xs]
    common = math.prod(denominators)
    scaled = [y * (common // d) % PRIME for (_, y), d in zip(points, denominators, strict=True)]
    inverse = pow(common % PRIME, -1, PRIME)

    def at(x: int) -> int:
        terms = (
            s * math.prod(x - x_j for x_j in xs if x_j != x_i) for s, x_i in zip(scaled, xs, strict=True)
        )
        return sum(terms) * inverse % PRIME

    return at


def _subsets(count: int, threshold: int) -> Iterator[tuple[int, ...]]:
    """Every `threshold`-subset of range(count), the first `threshold` first, then those of
    the first threshold + 1 that hold the last of them, and so on: one bad share among
    the first ones is passed over within `threshold` tries, two within about threshold**2/2."""
    yield tuple(range(threshold))
    for last in range(threshold, count):
        for rest in itertools.combinations(range(last), threshold - 1):
            yield (*rest, last)


def recover(
    shares: Sequence[Share],
    *,
    threshold: int,
    length: int,
    check: Callable[[bytes], bool],
    attempts: int = MAX_ATTEMPTS,
) -> tuple[bytes, frozenset[int]]:
    """The ``length``-byte secret that ``check`` accepts, from some ``threshold`` of ``shares``,
    and the ``x`` of the shares that are provably bad.

    Tries subsets in the order of ``_subsets`` (at most ``attempts``): the first ``threshold``
    shares, then subsets that leave out ever more of them. Once one passes ``check``, the
    polynomial through it is evaluated at every other share's ``x``. A share that is not a
    field element is always bad; shares off the polynomial are bad only when they are the
    fewest liars that explain the shares: a wrong polynomial with the right secret (colluding
    liars in the subset) differs from the dealt one by a polynomial with a root at 0, so it
    passes through at most ``threshold - 2`` honest shares, and blaming the agreeing shares
    instead would take at least ``agreeing - threshold + 2`` liars. When that does not
    settle it, the search goes on; if no subset settles it, only malformed shares are named.
    Raises ``ValueError`` when no subset passes (too few good shares, or shares of another
    secret): it never returns a secret the check refused.
    """
    if threshold < 1:
        raise ValueError(f"threshold must be at least 1, got {threshold}")
    if len({share.x for share in shares}) != len(shares):
        raise ValueError("shares with a repeated x")
    points: list[tuple[int, int]] = []
    malformed: set[int] = set()
    for share in shares:
        try:
            points.append(_decode(share))
        except ValueError:
            malformed.add(share.x)
    if len(points) < threshold:
        raise ValueError(f"need {threshold} well-formed shares to recover the secret, got {len(points)}")
    found: bytes | None = None
    for subset in itertools.islice(_subsets(len(points), threshold), attempts):
        polynomial = _polynomial([points[i] for i in subset])
        value = polynomial(0)
        if value >= 256**length or not check(secret := value.to_bytes(length, "big")):
            continue
        found = secret
        others = [points[i] for i in range(len(points)) if i not in subset]
        off = {x for x, y in others if polynomial(x) != y}
        if len(off) < len(points) - len(off) - threshold + 2:
            return secret, frozenset(malformed | off)
        # Ambiguous (liars in the subset whose errors cancel at 0): the secret is right, but
        # the shares off this polynomial may be honest. Search on for the dealt polynomial.
    if found is None:
        raise ValueError(
            f"no {threshold} of the {len(points)} well-formed shares give a secret that passes the check"
        )
    return found, frozenset(malformed)
