"""Distributed DP's small secure sum (Kairouz, Liu, Steinke 2021): the randomized Hadamard
rotation against scipy's Hadamard matrix, bit packing round trips, and the 16- to 20-bit
modular sum under the real SecAgg+ stages, which must equal the plain integer sum and never
wrap at the scale the round plans, where the same sum without the rotation does."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.errors import PrivacyBudgetError
from fedcore.privacy import distributed, rotation
from fedcore.privacy.randomness import SecureRandom
from fedcore.privacy.site_policy import SitePolicy, SitePrivacy
from fedcore.secagg.common import RoundParams
from fedcore.secagg.local import run_round
from fedcore.secagg.packing import pack, packed_size, unpack


@pytest.mark.parametrize("dimension", [1, 2, 5, 64, 100])
def test_the_rotation_is_the_hadamard_matrix_times_public_signs(dimension: int) -> None:
    x = np.random.default_rng(dimension).normal(size=dimension)
    n = rotation.padded(dimension)
    rotated = rotation.rotate(x, seed=7)
    assert rotated.size == n and n >= dimension and n & (n - 1) == 0 and n < 2 * max(dimension, 1)
    # H D [x, 0] / sqrt(n), with D the signs the seed draws (read off the rotation of e_i).
    signs = np.array([rotation.rotate(np.eye(n)[i], seed=7)[0] * math.sqrt(n) for i in range(n)])
    assert set(np.round(signs).tolist()) <= {-1.0, 1.0}
    padded = np.concatenate([x, np.zeros(n - dimension)])
    np.testing.assert_allclose(
        rotated, scipy.linalg.hadamard(n) @ (signs * padded) / math.sqrt(n), atol=1e-12
    )
    assert np.linalg.norm(rotated) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    np.testing.assert_allclose(rotation.unrotate(rotated, 7, dimension), x, atol=1e-12)
    assert not np.allclose(rotation.rotate(x, seed=8), rotated) or dimension == 1


def test_the_rotation_flattens_a_spike() -> None:
    """All of a vector's norm in one coordinate comes out spread: no coordinate above beta / sqrt(n)."""
    n = 4096
    spike = np.zeros(n)
    spike[123] = 1.0
    beta = rotation.flatness(n, 1e-6)
    assert np.abs(rotation.rotate(spike, seed=1)).max() <= beta / math.sqrt(n)


@settings(max_examples=60, deadline=None)
@given(st.integers(16, 31), st.integers(0, 70_000), st.integers(0, 2**32 - 1))
def test_packing_keeps_the_low_bits_in_the_fewest_bytes(bits: int, length: int, seed: int) -> None:
    values = np.random.default_rng(seed).integers(0, 2**32, size=length, dtype=np.uint64).astype(np.uint32)
    data = pack(values, bits)
    assert data.dtype == np.uint8 and data.size == packed_size(length, bits) == math.ceil(length * bits / 8)
    np.testing.assert_array_equal(unpack(data, bits, length), values & np.uint32((1 << bits) - 1))


def test_unpacking_refuses_a_vector_of_another_size() -> None:
    data = pack(np.arange(10, dtype=np.uint32), 20)
    for wrong in (data[:-1], np.concatenate([data, data[:1]]), data.view(np.int8)):
        with pytest.raises(ValueError):
            unpack(wrong, 20, 10)


@pytest.mark.parametrize("bits", [16, 20])
def test_the_modular_sum_under_secagg_is_the_integer_sum_and_decodes_to_the_sum(bits: int) -> None:
    """Ten sites encode (rotate, scale, round, noise) and mask modulo 2**bits with the real
    stages, packed on the way; the server's signed reading of the unmasked sum is exactly the
    plain sum of the encodings, its rotation back estimates the sum of the updates within the
    noise, and the noise it carries has variance n sigma^2 per rotated coordinate."""
    n, d = 10, 3000
    sites = [f"site-{i}" for i in range(n)]
    noise = distributed.DistributedNoise.for_model(
        dimension=d, clip_norm=1.0, noise_multiplier=1.0, sites=n, bits=bits, rotation_seed=99
    )
    length = noise.length(d) + 1
    params = RoundParams(1, tuple(sites), 9, 6, length, bits)
    g = np.random.default_rng(0)
    updates = {s: g.normal(0, 0.01, d) for s in sites}  # norm ~0.55: nothing clipped
    encoded = {s: distributed.encode(updates[s], noise, SecureRandom.seeded(i)) for i, s in enumerate(sites)}
    total = run_round(params, {s: e.astype(np.uint32) for s, e in encoded.items()})
    assert isinstance(total, np.ndarray) and total.max() < 2**bits
    held = distributed.signed(total, bits)
    np.testing.assert_array_equal(held, sum(encoded.values()))  # no coordinate wrapped
    decoded, count = distributed.decode(total, noise, d)
    assert count == n
    error = decoded - sum(updates.values())
    std = math.sqrt(n) * noise.sigma / noise.scale
    assert np.abs(error).max() < 6 * std
    silent = distributed.DistributedNoise(noise.clip_norm, noise.scale, 0.0, bits, noise.rotation)
    signal = sum(distributed.encode(updates[s], silent, SecureRandom.seeded(i)) for i, s in enumerate(sites))
    # Without noise the decoding is exact up to the sites' rounding (less than 1 per integer).
    exact, _ = distributed.decode(signal, silent, d)
    bound = n * math.sqrt(noise.length(d)) / noise.scale
    assert (
        np.linalg.norm(exact - sum(updates.values())) <= bound < 0.1 * np.linalg.norm(sum(updates.values()))
    )
    samples = (held - signal)[:-1].astype(np.float64)
    statistic = float(np.square(samples).sum() / (n * noise.sigma**2))
    assert 0.85 * samples.size < statistic < 1.15 * samples.size


def test_the_planned_scale_does_not_wrap_where_the_unrotated_sum_would() -> None:
    """The worst case for a modular sum: every site's whole clip in one coordinate. Rotated, the
    sum at the planned scale stays inside 2**(bits-1) in every coordinate; the same integers
    unrotated wrap (so the rotation is what makes 16 bits enough)."""
    n, d, bits = 50, 4096, 16
    noise = distributed.DistributedNoise.for_model(
        dimension=d, clip_norm=1.0, noise_multiplier=0.5, sites=n, bits=bits, rotation_seed=3
    )
    spike = np.zeros(d)
    spike[0] = 1.0
    total = sum(distributed.encode(spike, noise, SecureRandom.seeded(i)) for i in range(n))
    assert np.abs(total).max() < 2 ** (bits - 1)
    unrotated = n * noise.clip_norm * noise.scale  # the spike's coordinate, summed, not rotated
    assert unrotated > 2 ** (bits - 1)


def test_the_rounding_share_of_the_sensitivity_stays_small_or_the_round_refuses() -> None:
    for bits in (16, 20, 32):
        noise = distributed.DistributedNoise.for_model(
            dimension=650, clip_norm=1.0, noise_multiplier=1.0, sites=10, bits=bits
        )
        slack = math.sqrt(noise.length(650)) / (noise.clip_norm * noise.scale)
        assert slack <= distributed.MAX_ROUNDING_SLACK
        assert bits < 32 or slack == pytest.approx(distributed.ROUNDING_SLACK)
    with pytest.raises(ValueError, match="raise \\[secure_aggregation\\] bits"):
        distributed.DistributedNoise.for_model(
            dimension=2**22, clip_norm=1.0, noise_multiplier=1.0, sites=10, bits=16
        )


def test_the_epsilon_does_not_depend_on_the_modulus_beyond_the_rounding() -> None:
    """The same noise multiplier gives the same epsilon at 64 and 20 bits up to the rounding's
    share of Delta_2 (which the accounting includes): wrapping is post-processing."""
    d, n, z = 650, 10, 2.0
    plain = distributed.DistributedNoise.for_model(dimension=d, clip_norm=1.0, noise_multiplier=z, sites=n)
    small = distributed.DistributedNoise.for_model(
        dimension=d, clip_norm=1.0, noise_multiplier=z, sites=n, bits=20
    )
    rhos = [distributed.round_rho(dimension=d, noise=x, sites=n) for x in (plain, small)]
    assert rhos[0] == pytest.approx(rhos[1], rel=1e-9) == pytest.approx(1 / (2 * z**2), rel=1e-9)


@pytest.mark.parametrize("bits", [20, 64])
def test_a_site_refuses_integers_beyond_what_its_floats_make_exactly(tmp_path: Path, bits: int) -> None:
    """A dishonest server's plan: scale 2**59 and sigma ten times the sensitivity. The
    site's ledger would charge a multiplier of 5, but float draws that large have no random
    low bits (the attacker review told a zero update from a real one in one round): refused.
    An honest plan for the same model passes."""
    d = 100
    site = SitePrivacy(SitePolicy(ledger=tmp_path / "ledger.json"))
    job = {"delta": 1e-5, "run": "r", "dimension": d, "participants": 4}
    scale = 2.0**59
    sigma = 10 * distributed.sensitivity_l2(rotation.padded(d), 1.0, scale)
    with pytest.raises(PrivacyBudgetError, match="beyond"):
        site.plan_distributed(distributed.DistributedNoise(1.0, scale, sigma, bits, 5), **job)
    honest = distributed.DistributedNoise.for_model(
        dimension=d, clip_norm=1.0, noise_multiplier=1.0, sites=4, bits=bits, rotation_seed=5
    )
    assert site.plan_distributed(honest, **job).distributed == honest
    with pytest.raises(ValueError, match="exact range"):
        SecureRandom.seeded(1).discrete_gaussian(3, 2.0**50)


def test_a_sum_of_sites_whose_noise_is_too_fine_for_the_accounting_is_refused() -> None:
    """Kairouz et al.'s bound needs each site's sigma >= 1/2: one parameter summed over
    10,000 sites at 20 bits would be 0.12, and the round refuses rather than mis-account."""
    with pytest.raises(ValueError, match="sigma"):
        distributed.DistributedNoise.for_model(
            dimension=1, clip_norm=1.0, noise_multiplier=1.0, sites=10_000, bits=20
        )


def test_the_rotation_signs_are_shake256_of_the_seed_whatever_numpy_draws() -> None:
    """Every site and the server must draw the same signs: from SHAKE-256 (a standard), not
    from a numpy generator whose stream may change between versions."""
    stream = hashlib.shake_256(b"fedcore rotation|" + (42).to_bytes(8, "little")).digest(2)
    bits = [(stream[i // 8] >> (i % 8)) & 1 for i in range(16)]
    e0 = np.zeros(16)
    e0[0] = 1.0
    # The first column of H D is D's first sign times H's first column (all ones) / 4.
    first = rotation.rotate(e0, seed=42)
    assert np.all(first == (1 - 2 * bits[0]) / 4)
    signs = [rotation.rotate(np.eye(16)[i], seed=42)[0] * 4 for i in range(16)]
    assert signs == [1 - 2 * b for b in bits]
