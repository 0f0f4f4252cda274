"""Quantization for secure aggregation: unbiased, bounded error, and the modular sum of
quantized inputs dequantizes to exactly the sum of the dequantized inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.privacy.randomness import SecureRandom
from fedcore.secagg.contribution import quantized_contribution
from fedcore.secagg.quantize import clip, dequantize, quantize, signed, step_for


@settings(max_examples=60, deadline=None)
@given(
    sites=st.integers(1, 50),
    length=st.integers(1, 200),
    bound=st.floats(1e-3, 1e3),
    bits=st.sampled_from([32, 64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_modular_sum_dequantizes_exactly(
    sites: int, length: int, bound: float, bits: int, seed: int
) -> None:
    g = np.random.default_rng(seed)
    step = step_for(sites * bound, bits=bits)
    inputs = [clip(g.normal(0, bound, length), bound) for _ in range(sites)]
    r = SecureRandom.seeded(seed)
    quantized = [quantize(x, step=step, bits=bits, rng=r) for x in inputs]
    total = np.zeros(length, dtype=quantized[0].dtype)
    for q in quantized:
        total += q  # modulo 2**bits, as the secure sum
    plain = sum(signed(q) for q in quantized)  # exact integers
    np.testing.assert_array_equal(signed(total), plain)
    np.testing.assert_allclose(dequantize(total, step=step), sum(inputs), atol=sites * step)


def test_rounding_is_unbiased_and_within_one_step() -> None:
    step = 0.1
    x = np.full(200_000, 0.037)
    q = dequantize(quantize(x, step=step, bits=32, rng=SecureRandom.seeded(0)), step=step)
    assert np.abs(q - x).max() <= step
    # 0.037 = 0.37 steps: rounds up with probability 0.37; the mean must match (5 sigma).
    sigma = step * np.sqrt(0.37 * 0.63 / len(x))
    assert abs(q.mean() - 0.037) < 5 * sigma


@pytest.mark.parametrize("bits", [32, 64])
def test_negative_values_wrap_in_twos_complement(bits: int) -> None:
    q = quantize(np.array([-1.0, 0.0, 2.0]), step=1.0, bits=bits, rng=SecureRandom.seeded(1))
    np.testing.assert_array_equal(signed(q), [-1, 0, 2])


def test_values_outside_the_range_are_refused() -> None:
    g = SecureRandom.seeded(2)
    with pytest.raises(ValueError):
        quantize(np.array([1e30]), step=1.0, bits=32, rng=g)
    with pytest.raises(ValueError):
        quantize(np.array([np.nan]), step=1.0, bits=32, rng=g)


def test_a_contribution_with_nan_or_a_clip_beyond_the_range_is_refused() -> None:
    template = {"w": np.zeros(200_000, np.float32)}
    update = {"w": np.full(200_000, 0.5, np.float32)}
    update["w"][150_000] = np.nan  # in the third piece
    step = step_for(10.0, bits=32)
    with pytest.raises(ValueError, match="not finite"):
        quantized_contribution(
            update, template, weight=1.0, clip=1.0, step=step, bits=32, rng=SecureRandom.seeded(3)
        )
    with pytest.raises(ValueError, match="clipping range"):
        quantized_contribution(
            template, template, weight=1.0, clip=1e12, step=step, bits=32, rng=SecureRandom.seeded(3)
        )
    clean = quantized_contribution(
        template, template, weight=1.0, clip=1.0, step=step, bits=32, rng=SecureRandom.seeded(3)
    )
    np.testing.assert_array_equal(signed(clean)[:-1], 0)
