"""The server's streaming sum: the same bits for every arrival order, within one grid step of
the exact (rational) weighted sum, and a reply out of range changes nothing."""

from __future__ import annotations

import asyncio
import math
import random
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.aggregation import RoundContext, RoundInfo, SiteReply, exact_sum
from fedcore.aggregation.exact_sum import GUARD, ExactSum, model_scale
from fedcore.aggregation.mean import WeightedMean
from fedcore.errors import ProtocolError

values = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@pytest.fixture(params=["grid", "fsum"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of summing: the fixed-point grid (big models) and math.fsum (small vectors)."""
    monkeypatch.setattr(exact_sum, "SMALL", 0 if request.param == "grid" else 1 << 20)
    return str(request.param)


def replies(seed: int, sites: int, size: int, spread: float) -> list[tuple[dict[str, np.ndarray], float]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(sites):
        magnitudes = 10.0 ** rng.uniform(-spread, 0, size)  # many binades: float sums would differ
        update = {"w": (rng.choice([-1, 1], size) * magnitudes).astype(np.float32).reshape(2, -1)}
        out.append((update, float(rng.integers(1, 100_000))))
    return out


def fold(model: dict[str, np.ndarray], items: list[tuple[dict[str, np.ndarray], float]]) -> ExactSum:
    total = ExactSum(model, max_weight=100_000, sites=len(items))
    for update, weight in items:
        total.add(update, weight)
    return total


@pytest.mark.parametrize("seed", range(3))
def test_every_arrival_order_gives_the_same_bits(seed: int, path: str) -> None:
    model = {"w": np.ones((2, 500), np.float32)}
    items = replies(seed, 40, 1000, spread=12)
    first = fold(model, items)
    float_sums = set()
    for shuffle in range(10):
        order = items[:]
        random.Random(shuffle).shuffle(order)
        again = fold(model, order)
        assert again.total()["w"].tobytes() == first.total()["w"].tobytes()
        assert again.weight == first.weight
        naive = np.zeros((2, 500))
        for update, weight in order:
            naive += update["w"] * weight
        float_sums.add(naive.tobytes())
    assert len(float_sums) > 1  # the claim has teeth: a float64 fold does depend on the order


@given(
    st.lists(
        st.tuples(st.lists(values, min_size=3, max_size=3), st.integers(1, 100_000)), min_size=1, max_size=12
    )
)
@settings(max_examples=200, deadline=None)
def test_the_sum_is_within_one_grid_step_per_reply_of_the_exact_one(
    items: list[tuple[list[float], int]],
) -> None:
    model = {"w": np.array([0.5, -2.0, 0.0], np.float32)}
    updates = [({"w": np.array(v, np.float32)}, float(w)) for v, w in items]
    total = fold(model, updates)
    step = model_scale(model) * 2.0**-total.fraction_bits
    got = total.total()["w"]
    for i in range(3):
        exact = sum(Fraction(float(u["w"][i])) * Fraction(w) for u, w in updates)
        assert (
            abs(Fraction(float(got[i])) - exact)
            <= len(updates) * Fraction(step) / 2 + abs(exact) * Fraction(2) ** -52
        )
    assert total.weight == sum(w for _, w in items)


def test_precision_is_far_beyond_float32_at_a_realistic_scale() -> None:
    total = ExactSum({"w": np.ones(4096, np.float32)}, max_weight=100_000, sites=1000)
    assert total.fraction_bits >= 35  # a mean is exact to 2**-36 of the model's scale


def test_small_vectors_take_any_magnitude_exactly() -> None:
    """The statistics exchange's sums (counts, sums of squares of incomes) on a zero template."""
    total = ExactSum({"s": np.zeros(3)}, max_weight=1, sites=3)
    for values in ([1e6, 3.5e4 * 1e6, 2.5e9 * 1e6], [1.0, 5e4, 2.5e9], [3.0, 1e-9, 1e15]):
        total.add({"s": np.array(values)}, 1.0)
    assert total.total()["s"].tolist() == [
        1e6 + 4.0,
        math.fsum([3.5e10, 5e4, 1e-9]),
        math.fsum([2.5e15, 2.5e9, 1e15]),
    ]


def test_a_reply_out_of_range_is_refused_and_changes_nothing(path: str) -> None:
    model = {"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)}
    total = ExactSum(model, max_weight=100_000, sites=3)
    total.add({"a": np.full(3, 0.25, np.float32), "b": np.full(2, -0.5, np.float32)}, 3.0)
    before = {k: v.copy() for k, v in total.total().items()}
    too_big = {"a": np.full(3, 0.1, np.float32), "b": np.array([1.0, 2.0**GUARD * 2], np.float32)}
    if path == "grid":  # a small vector takes any finite magnitude
        with pytest.raises(ProtocolError, match="exceeds"):
            total.add(too_big, 1.0)
    with pytest.raises(ProtocolError, match="weight"):
        total.add({"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}, 100_001.0)
    assert all(np.array_equal(before[k], v) for k, v in total.total().items())
    assert total.count == 1 and total.weight == 3.0


def test_carries_across_the_limbs_are_exact(path: str) -> None:
    # Values whose grid representation straddles the low limb, of both signs, many times over.
    model = {"w": np.ones(6, np.float32)}
    items = [({"w": np.array([1.0, -1.0, 1e-9, -1e-9, 0.7, -0.3], np.float32)}, 7.0)] * 300
    total = ExactSum(model, max_weight=7, sites=300)
    for update, weight in items:
        total.add(update, weight)
    want = [math.fsum([float(v) * 7.0] * 300) for v in items[0][0]["w"]]
    step = 0.0 if total.small else 2.0**-total.fraction_bits  # the model's scale is 1
    np.testing.assert_allclose(total.total()["w"], want, rtol=1e-15, atol=300 * step / 2)


def test_the_plain_leaf_gives_the_same_model_for_every_arrival_order(path: str) -> None:
    """WeightedMean folding replies in a shuffled order, as a transport would deliver them."""
    model = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}
    rng = np.random.default_rng(0)
    sites = [f"site-{i}" for i in range(12)]
    sent = {
        s: SiteReply(
            s,
            {
                k: (rng.standard_normal(v.shape) * 10.0 ** rng.uniform(-8, 0)).astype(np.float32)
                for k, v in model.items()
            },
            float(rng.integers(1, 1000)),
            {"train_loss": float(rng.uniform())},
        )
        for s in sites
    }
    info = RoundInfo("run", 1, 1, tuple(sites), len(sites), model, 0, 100_000)

    def run(order: list[str]) -> tuple[dict[str, bytes], list[str], float]:
        async def exchange(name, chosen, request, accept):  # type: ignore[no-untyped-def]
            for site in order:
                accept(sent[site])
            return {}

        context = RoundContext(info, exchange, lambda i: (), lambda r: r, lambda n: None, False)
        aggregate = asyncio.run(WeightedMean().collect(context))
        return {k: v.tobytes() for k, v in aggregate.mean.items()}, aggregate.contributors, aggregate.weight

    first = run(sites)
    for seed in range(8):
        order = sites[:]
        random.Random(seed).shuffle(order)
        assert run(order) == first


def test_the_largest_values_allowed_do_not_wrap(path: str) -> None:
    """Every site at the weight bound with every value at the guard: the limbs hold the total."""
    sites, bound = 4, 10**9
    model = {"w": np.ones(2048, np.float32)}
    edge = np.full(2048, 2.0**GUARD, np.float32)
    edge[1::2] *= -1
    total = ExactSum(model, max_weight=bound, sites=sites)
    for _ in range(sites):
        total.add({"w": edge}, float(bound))
    np.testing.assert_array_equal(total.total()["w"], edge.astype(np.float64) * bound * sites)
