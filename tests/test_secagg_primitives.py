"""fedcore.secagg: X25519 + HKDF agreement, AES-GCM, AES-CTR mask expansion, Shamir over GF(2**521 - 1)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.errors import SecurityError
from fedcore.secagg import shamir
from fedcore.secagg.primitives import (
    KeyPair,
    add_mask,
    agree,
    decrypt,
    encrypt,
    expand_mask,
    generate_keypair,
)
from fedcore.secagg.shamir import PRIME, SHARE_BYTES, Share, combine, split

FAST = settings(max_examples=60, deadline=None)


# ---------------------------------------------------------------- Shamir


@st.composite
def sharings(draw: st.DrawFn) -> tuple[bytes, int, int, list[int]]:
    """A secret, n, t and a random subset of t share indices."""
    secret = draw(st.binary(min_size=0, max_size=64))
    n = draw(st.integers(1, 30))
    t = draw(st.integers(1, n))
    subset = draw(st.permutations(range(n)))[:t]
    return secret, n, t, subset


@FAST
@given(sharings())
def test_any_t_shares_recover_the_secret(case: tuple[bytes, int, int, list[int]]) -> None:
    secret, n, t, subset = case
    shares = split(secret, shares=n, threshold=t)
    assert [s.x for s in shares] == list(range(1, n + 1))
    assert all(len(s.y) == SHARE_BYTES and int.from_bytes(s.y, "big") < PRIME for s in shares)
    assert combine([shares[i] for i in subset], threshold=t, length=len(secret)) == secret


@FAST
@given(sharings())
def test_fewer_than_t_shares_are_refused(case: tuple[bytes, int, int, list[int]]) -> None:
    secret, n, t, subset = case
    shares = split(secret, shares=n, threshold=t)
    with pytest.raises(ValueError, match="need"):
        combine([shares[i] for i in subset[: t - 1]], threshold=t, length=len(secret))


def _poly_mul(a: list[int], b: list[int]) -> list[int]:
    out = [0] * (len(a) + len(b) - 1)
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            out[i + j] = (out[i + j] + ai * bj) % PRIME
    return out


def _interpolate(points: list[tuple[int, int]]) -> list[int]:
    """Coefficients (lowest degree first) of the polynomial of degree < len(points) through them."""
    coefficients = [0] * max(len(points), 1)
    for i, (x_i, y_i) in enumerate(points):
        basis, scale = [1], y_i
        for j, (x_j, _) in enumerate(points):
            if j != i:
                basis = _poly_mul(basis, [-x_j % PRIME, 1])
                scale = scale * pow(x_i - x_j, -1, PRIME) % PRIME
        for k, c in enumerate(basis):
            coefficients[k] = (coefficients[k] + c * scale) % PRIME
    return coefficients


def _feed(values: list[int]) -> Callable[[int], bytes]:
    """A ``randbytes`` that hands out the given coefficients (each < p, so reduction keeps them)."""
    it: Iterator[int] = iter(values)
    return lambda n: next(it).to_bytes(n, "big")


@FAST
@given(
    st.integers(2, 6).flatmap(
        lambda t: st.tuples(
            st.just(t),
            st.integers(t, 8),
            st.binary(min_size=32, max_size=32),
            st.binary(min_size=32, max_size=32),
            st.randoms(use_true_random=False),
        )
    )
)
def test_t_minus_1_shares_are_consistent_with_every_secret(
    case: tuple[int, int, bytes, bytes, random.Random],
) -> None:
    """For t-1 shares of one secret, the dealer could have drawn coefficients giving the same shares for any
    other secret: those shares carry no information about which one it was."""
    t, n, secret, other, rnd = case
    shares = split(secret, shares=n, threshold=t)
    seen = sorted(rnd.sample(shares, t - 1), key=lambda s: s.x)  # which t-1 shares: not secret
    s_other = int.from_bytes(other, "big")
    # f'(x) = s' + x g(x), with g of degree t-2 through (x, (y - s') / x) for the seen shares.
    g = _interpolate(
        [(s.x, (int.from_bytes(s.y, "big") - s_other) * pow(s.x, -1, PRIME) % PRIME) for s in seen]
    )
    alternative = split(other, shares=n, threshold=t, randbytes=_feed(g[: t - 1]))
    assert [alternative[s.x - 1] for s in seen] == seen
    assert combine(alternative, threshold=t, length=32) == other


def _chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


def test_t_minus_1_shares_look_the_same_whatever_the_secret() -> None:
    """Statistically: the low byte of each of t-1 shares is uniform and independent of the secret.

    Fails if coefficients were zero, constant, or too few bits (shares would then depend on the secret).
    """
    runs, t, n, seen = 4000, 3, 5, (2, 5)
    low: dict[bytes, list[list[int]]] = {}
    for secret in (bytes(64), b"\xff" * 64):
        rows = [split(secret, shares=n, threshold=t) for _ in range(runs)]
        low[secret] = [[row[x - 1].y[-1] for row in rows] for x in seen]
    for columns in low.values():
        for column in columns:
            # 255 degrees of freedom: mean 255, sd 22.6; 450 is far in the tail (p < 1e-12).
            assert _chi_square(np.bincount(column, minlength=256)) < 450
    for a, b in zip(*low.values(), strict=True):
        # Two-sample test on 16 coarse bins (15 degrees of freedom, mean 15): same distribution.
        ca, cb = np.bincount(np.array(a) >> 4, minlength=16), np.bincount(np.array(b) >> 4, minlength=16)
        stat = float((((ca - cb) ** 2) / (ca + cb)).sum())
        assert stat < 80
    # Pairs of shares from one split: joint distribution of (low nibble, low nibble) is uniform too.
    pairs = np.array(low[bytes(64)][0]) % 16 * 16 + np.array(low[bytes(64)][1]) % 16
    assert _chi_square(np.bincount(pairs, minlength=256)) < 450


def test_split_draws_72_bytes_per_coefficient_and_reduces_them() -> None:
    calls: list[int] = []

    def randbytes(k: int) -> bytes:
        calls.append(k)
        return b"\xff" * k  # 2**576 - 1: far above p, must be reduced

    shares = split(b"secret", shares=7, threshold=4, randbytes=randbytes)
    assert calls == [72, 72, 72]
    assert all(int.from_bytes(s.y, "big") < PRIME for s in shares)
    assert combine(shares[3:], threshold=4, length=6) == b"secret"
    again = split(b"secret", shares=7, threshold=4, randbytes=lambda k: b"\xff" * k)
    assert again == shares  # randomness only from randbytes
    with pytest.raises(ValueError, match="randbytes returned"):
        split(b"s", shares=3, threshold=2, randbytes=lambda k: b"\x01" * (k - 1))


def test_threshold_one_and_leading_zeros() -> None:
    assert all(s.y[-3:] == b"\x00ab" for s in split(b"\x00ab", shares=4, threshold=1))
    shares = split(b"\x00\x00z", shares=3, threshold=2)
    assert combine(shares[1:], threshold=2, length=3) == b"\x00\x00z"
    assert combine(shares, threshold=2, length=3) == b"\x00\x00z"
    assert combine(split(b"", shares=2, threshold=2), threshold=2, length=0) == b""


def test_split_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at most 64"):
        split(bytes(65), shares=3, threshold=2)
    for n, t in [(3, 0), (3, 4), (0, 0), (PRIME, 2)]:
        with pytest.raises(ValueError, match="threshold"):
            split(b"s", shares=n, threshold=t)


def test_combine_rejects_malformed_shares() -> None:
    shares = split(b"sixteen byte key", shares=5, threshold=3)
    good = shares[:3]

    def fails(bad: list[Share], match: str, **kw: int) -> None:
        with pytest.raises(ValueError, match=match):
            combine(bad, threshold=kw.get("threshold", 3), length=kw.get("length", 16))

    fails([good[0], good[1], good[0]], "repeated")
    fails([*good, Share(x=1, y=shares[3].y)], "repeated")  # also among extra shares
    for x in (0, -1, PRIME):
        fails([Share(x=x, y=good[0].y), *good[1:]], "out of range")
    fails([Share(x=1, y=good[0].y[1:]), *good[1:]], "66 bytes")
    fails([Share(x=1, y=PRIME.to_bytes(SHARE_BYTES, "big")), *good[1:]], "not an element")
    fails(good[:2], "need 3")
    fails(good, "length", length=65)
    fails(good, "threshold", threshold=0)
    # Shares of a 16-byte secret do not decode as a 2-byte one.
    fails(good, "do not encode", length=2)
    assert "y=" not in repr(good[0])  # share values stay out of logs


def test_a_lying_share_holder_changes_the_result_undetected() -> None:
    """Documented limitation: Shamir sharing alone is not verifiable."""
    shares = split(bytes(32), shares=3, threshold=2)
    # With x = 1, 2: f(0) = 2 f(1) - f(2). Raising f(2) by 2 makes f(0) = -2 = p - 2, too big for 32 bytes:
    y = (int.from_bytes(shares[1].y, "big") + 2) % PRIME
    lie = Share(x=2, y=y.to_bytes(SHARE_BYTES, "big"))
    with pytest.raises(ValueError, match="do not encode"):
        combine([shares[0], lie], threshold=2, length=32)
    # ... but lowering it by 2 gives f(0) = 2, a valid 32-byte secret: the lie goes unnoticed.
    y = (int.from_bytes(shares[1].y, "big") - 2) % PRIME
    lie = Share(x=2, y=y.to_bytes(SHARE_BYTES, "big"))
    assert combine([shares[0], lie], threshold=2, length=32) == (2).to_bytes(32, "big")


def test_shamir_module_uses_no_weak_randomness() -> None:
    import inspect

    source = inspect.getsource(shamir)
    assert "import random" not in source and "np.random" not in source


# ---------------------------------------------------------------- key agreement


def test_agree_is_symmetric_and_purpose_bound() -> None:
    a, b, c = generate_keypair(), generate_keypair(), generate_keypair()
    assert isinstance(a, KeyPair) and len(a.public) == 32
    ab = agree(a.private, b.public, info=b"fedcore/test/mask")
    assert len(ab) == 32
    assert ab == agree(b.private, a.public, info=b"fedcore/test/mask")
    assert ab == agree(a.key(), b.public, info=b"fedcore/test/mask")  # a loaded key: the same
    assert ab != agree(a.private, b.public, info=b"fedcore/test/encryption")
    assert ab != agree(a.private, c.public, info=b"fedcore/test/mask")
    assert len({generate_keypair().public for _ in range(5)}) == 5


@pytest.mark.parametrize(
    "peer",
    [
        b"",
        bytes(31),
        bytes(33),
        bytes(32),  # u = 0: low order, all-zero shared secret
        (1).to_bytes(32, "little"),  # u = 1: low order
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),  # order 8
        (2**255 - 19 - 1).to_bytes(32, "little"),  # u = p - 1: low order
    ],
)
def test_agree_rejects_malformed_peer_keys(peer: bytes) -> None:
    with pytest.raises(SecurityError):
        agree(generate_keypair().private, peer, info=b"x")


# ---------------------------------------------------------------- authenticated encryption


def test_encrypt_round_trip_with_fresh_nonces() -> None:
    key = agree(generate_keypair().private, generate_keypair().public, info=b"enc")
    for plaintext in (b"", b"share", bytes(range(256)) * 4):
        box = encrypt(key, plaintext, associated=b"round 3 from a to b")
        assert len(box) == 12 + len(plaintext) + 16
        assert decrypt(key, box, associated=b"round 3 from a to b") == plaintext
    assert encrypt(key, b"m", associated=b"") != encrypt(key, b"m", associated=b"")


def test_decrypt_refuses_tampering_wrong_context_and_wrong_key() -> None:
    key, other = b"k" * 32, b"K" * 32
    box = encrypt(key, b"a Shamir share", associated=b"ctx")
    for i, bit in itertools.product(range(len(box)), (0x01, 0x80)):
        tampered = bytearray(box)
        tampered[i] ^= bit
        with pytest.raises(SecurityError):
            decrypt(key, bytes(tampered), associated=b"ctx")
    for bad in (b"", b"ctx ", b"CTX"):
        with pytest.raises(SecurityError):
            decrypt(key, box, associated=bad)
    with pytest.raises(SecurityError):
        decrypt(other, box, associated=b"ctx")
    for length in (0, 1, 12, 27, len(box) - 1):
        with pytest.raises(SecurityError):
            decrypt(key, box[:length], associated=b"ctx")
    with pytest.raises(SecurityError):
        decrypt(key, box + b"\x00", associated=b"ctx")
    for short_key in (b"", bytes(16), bytes(31)):
        with pytest.raises(ValueError, match="32 bytes"):
            encrypt(short_key, b"m", associated=b"")
        with pytest.raises(ValueError, match="32 bytes"):
            decrypt(short_key, box, associated=b"ctx")


# ---------------------------------------------------------------- mask expansion


def test_expand_mask_is_the_aes_ctr_keystream_little_endian() -> None:
    """Reference built independently: AES-256-ECB of the big-endian counter blocks 0, 1, 2, ..."""
    seed = bytes(range(32))
    ecb = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    stream = ecb.update(b"".join(i.to_bytes(16, "big") for i in range(8))) + ecb.finalize()
    m32, m64 = expand_mask(seed, 30), expand_mask(seed, 15, bits=64)
    assert m32.tolist() == [int.from_bytes(stream[4 * i : 4 * i + 4], "little") for i in range(30)]
    assert m64.tolist() == [int.from_bytes(stream[8 * i : 8 * i + 8], "little") for i in range(15)]


def test_expand_mask_shape_dtype_determinism() -> None:
    a, b = b"\x01" * 32, b"\x02" * 32
    m = expand_mask(a, 1000)
    assert m.dtype == np.uint32 and m.shape == (1000,) and m.flags.writeable
    assert expand_mask(a, 1000, bits=64).dtype == np.uint64
    assert np.array_equal(m, expand_mask(a, 1000))
    assert np.array_equal(expand_mask(a, 10), m[:10])  # a prefix of the same stream
    assert np.count_nonzero(m == expand_mask(b, 1000)) < 5
    assert expand_mask(a, 0).shape == (0,)
    assert expand_mask(a, 3, bits=64).shape == (3,)
    m += 1  # writable and wraps modulo 2**32
    assert m.dtype == np.uint32


@pytest.mark.parametrize(
    ("seed", "count", "bits", "match"),
    [
        (bytes(31), 4, 32, "32 bytes"),
        (bytes(16), 4, 32, "32 bytes"),
        (bytes(33), 4, 32, "32 bytes"),
        (bytes(32), 4, 16, "bits"),
        (bytes(32), 4, 128, "bits"),
        (bytes(32), -1, 32, "non-negative"),
    ],
)
def test_expand_mask_rejects_bad_arguments(seed: bytes, count: int, bits: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        expand_mask(seed, count, bits=bits)


@pytest.mark.parametrize("bits", [32, 64])
def test_expand_mask_top_byte_is_uniform(bits: int) -> None:
    values = expand_mask(bytes.fromhex("5ec0" * 16), 1_000_000, bits=bits)
    top = (values >> np.uint64(bits - 8)).astype(np.int64)
    stat = _chi_square(np.bincount(top, minlength=256))
    # 255 degrees of freedom: mean 255, sd 22.6. Generous both ways, and the seed is fixed.
    assert 150 < stat < 400, stat
    assert abs(float(values.astype(np.float64).mean()) / 2.0**bits - 0.5) < 0.002


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 3000), st.sampled_from([32, 64]), st.booleans(), st.binary(min_size=32, max_size=32))
def test_add_mask_in_place_equals_adding_the_expanded_mask(
    count: int, bits: int, subtract: bool, seed: bytes
) -> None:
    dtype = np.uint32 if bits == 32 else np.uint64
    base = np.random.default_rng(count).integers(0, 2**bits, count, dtype=dtype)
    into = base.copy()
    add_mask(into, seed, subtract=subtract)
    mask = expand_mask(seed, count, bits=bits)
    assert np.array_equal(into, base - mask if subtract else base + mask)


def test_add_mask_reuses_buffers_safely_across_sizes_and_rejects_bad_vectors() -> None:
    seed = b"\x09" * 32
    big, small = np.zeros(50_000, np.uint64), np.zeros(7, np.uint32)
    add_mask(big, seed)
    add_mask(small, seed)  # a smaller mask after a larger one: only its own prefix counts
    assert np.array_equal(small, expand_mask(seed, 7))
    assert np.array_equal(big, expand_mask(seed, 50_000, bits=64))
    with pytest.raises(ValueError, match="uint32/uint64"):
        add_mask(np.zeros(4, np.int64), seed)
    with pytest.raises(ValueError, match="32 bytes"):
        add_mask(np.zeros(4, np.uint32), bytes(16))


def test_add_mask_is_safe_in_concurrent_threads() -> None:
    """Sites of an in-process federation mask in parallel threads: each thread's keystream
    buffer must be its own (a shared one once gave wrong sums)."""
    import threading

    seeds = [bytes([i]) * 32 for i in range(8)]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        into = np.zeros(300_000, np.uint32)  # several buffer-sized pieces
        for _ in range(5):
            into[:] = 0
            add_mask(into, seeds[i])
        results[i] = into

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, seed in enumerate(seeds):
        assert np.array_equal(results[i], expand_mask(seed, 300_000))
