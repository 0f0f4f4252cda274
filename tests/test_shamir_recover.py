"""Checked Shamir reconstruction: `recover` returns only a secret the caller's check accepts,
passes over wrong shares with the spare ones, names them, and fails rather than guess."""

from __future__ import annotations

import dataclasses
import os

import pytest

from fedcore.secagg import shamir
from fedcore.secagg.shamir import Share, recover, split

SECRET = os.urandom(32)


def is_secret(candidate: bytes) -> bool:
    return candidate == SECRET


def bad(share: Share) -> Share:
    return dataclasses.replace(share, y=share.y[:-1] + bytes([share.y[-1] ^ 1]))


def test_honest_shares_give_the_secret_and_name_nobody() -> None:
    shares = split(SECRET, shares=7, threshold=4)
    assert recover(shares, threshold=4, length=32, check=is_secret) == (SECRET, frozenset())


@pytest.mark.parametrize("position", [0, 2, 4])
def test_one_bad_share_among_threshold_plus_one_is_named(position: int) -> None:
    shares = split(SECRET, shares=5, threshold=4)
    shares[position] = bad(shares[position])
    assert recover(shares, threshold=4, length=32, check=is_secret) == (SECRET, frozenset({position + 1}))


def test_threshold_shares_with_one_bad_fail_and_give_no_secret() -> None:
    shares = split(SECRET, shares=4, threshold=4)
    shares[1] = bad(shares[1])
    with pytest.raises(ValueError, match="passes the check"):
        recover(shares, threshold=4, length=32, check=is_secret)


def test_several_bad_and_malformed_shares_are_passed_over() -> None:
    shares = split(SECRET, shares=10, threshold=4)
    shares[0], shares[3] = bad(shares[0]), bad(shares[3])
    shares[5] = Share(6, b"short")  # not a field element: bad whatever else holds
    secret, named = recover(shares, threshold=4, length=32, check=is_secret)
    assert secret == SECRET and named == {1, 4, 6}


def test_colluding_liars_are_not_blamed_on_honest_shares() -> None:
    """Two liars in the first subset whose errors cancel at 0: the secret passes the check
    but the polynomial is wrong; with as many honest shares off it as liars on it, nobody
    is named (an honest share is never blamed on an ambiguous count)."""
    t = 4
    shares = split(SECRET, shares=t + 2, threshold=t)
    xs = [s.x for s in shares[:t]]

    def weight(i: int) -> int:  # Lagrange basis i at 0 over the first t points
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num, den = num * xj % shamir.PRIME, den * (xj - xs[i]) % shamir.PRIME
        return num * pow(den, -1, shamir.PRIME) % shamir.PRIME

    e0 = 12345
    e1 = (-e0 * weight(0) * pow(weight(1), -1, shamir.PRIME)) % shamir.PRIME
    for i, e in ((0, e0), (1, e1)):
        y = (int.from_bytes(shares[i].y, "big") + e) % shamir.PRIME
        shares[i] = Share(shares[i].x, y.to_bytes(shamir.SHARE_BYTES, "big"))
    secret, named = recover(shares, threshold=t, length=32, check=is_secret)
    assert secret == SECRET and named == frozenset()


def test_the_search_is_bounded() -> None:
    shares = [bad(s) for s in split(SECRET, shares=12, threshold=5)]
    calls = []

    def counting(candidate: bytes) -> bool:
        calls.append(candidate)
        return False

    with pytest.raises(ValueError):
        recover(shares, threshold=5, length=32, check=counting, attempts=50)
    assert len(calls) <= 50


def test_repeated_or_too_few_shares_are_refused() -> None:
    shares = split(SECRET, shares=5, threshold=3)
    with pytest.raises(ValueError, match="repeated"):
        recover([shares[0], shares[0], shares[1]], threshold=3, length=32, check=is_secret)
    with pytest.raises(ValueError, match="well-formed"):
        recover([shares[0], Share(2, b""), shares[2]], threshold=3, length=32, check=is_secret)
