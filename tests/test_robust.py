"""fedcore.aggregation.robust (median, trimmed mean, Krum, multi-Krum) and fedcore.simulation.byzantine."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from fedcore.aggregation.robust import (
    aggregate,
    coordinate_median,
    krum,
    krum_scores,
    multi_krum,
    trimmed_mean,
)
from fedcore.simulation.byzantine import Attack, attack, attackers

SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def matrices(draw: st.DrawFn) -> np.ndarray:
    n = draw(st.integers(1, 9))
    d = draw(st.integers(1, 6))
    values = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
    return draw(hnp.arrays(np.float64, (n, d), elements=values))


@st.composite
def krum_cases(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    """Small-integer matrices (exact arithmetic, many ties), f with n >= 2f + 3, and an m."""
    n = draw(st.integers(3, 9))
    f = draw(st.integers(0, (n - 3) // 2))
    d = draw(st.integers(1, 5))
    bound = draw(st.sampled_from([1, 3, 20]))
    x = draw(hnp.arrays(np.float64, (n, d), elements=st.integers(-bound, bound).map(float)))
    return x, f, draw(st.integers(1, n))


# --- brute-force references: plain loops, exact on these inputs ----------------------------


def ref_scores(rows: list[list[float | Fraction]], f: int, among: list[int]) -> list[float | Fraction]:
    k = len(among) - f - 2
    out = []
    for i in among:
        dists = sorted(
            sum((a - b) ** 2 for a, b in zip(rows[i], rows[j], strict=True)) for j in among if j != i
        )
        out.append(sum(dists[:k]))
    return out


def ref_argmin(values: list[float | Fraction]) -> int:
    best = 0
    for i in range(1, len(values)):
        if values[i] < values[best]:  # strict: the lowest index wins a tie
            best = i
    return best


def ref_multi_krum(rows: list[list[float | Fraction]], f: int, m: int) -> list[int]:
    n = len(rows)
    remaining, selected = list(range(n)), []
    while len(selected) < m and len(remaining) >= 2 * f + 3:
        selected.append(remaining.pop(ref_argmin(ref_scores(rows, f, remaining))))
    full = ref_scores(rows, f, list(range(n)))
    while len(selected) < m:
        selected.append(remaining.pop(ref_argmin([full[i] for i in remaining])))
    return selected


# --- median and trimmed mean -----------------------------------------------------------------


@SETTINGS
@given(matrices())
def test_median_is_numpys(x: np.ndarray) -> None:
    np.testing.assert_array_equal(coordinate_median(x), np.median(x, axis=0))


@SETTINGS
@given(matrices(), st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.45]))
def test_trimmed_mean_is_scipys(x: np.ndarray, trim: float) -> None:
    expected = stats.trim_mean(x, trim, axis=0)
    np.testing.assert_allclose(trimmed_mean(x, trim), expected, rtol=1e-12, atol=1e-8)


def test_trimmed_mean_cuts_per_end_and_reports_who() -> None:
    x = np.tile(np.arange(10.0)[:, None], (1, 4))  # row i is all i
    x[3], x[7] = 100.0, -100.0
    # trim 0.1 of 10 cuts one value per end: 100 and -100 in every coordinate.
    np.testing.assert_array_equal(trimmed_mean(x, 0.1), np.full(4, (45.0 - 3 - 7) / 8))
    result = aggregate("trimmed_mean", x, trim=0.1)
    assert result.trimmed == [3, 7]
    assert result.selected == []
    # Cut in only one of four coordinates: not reported.
    y = np.tile(np.arange(10.0)[:, None], (1, 4))
    y[3, 0], y[7, 0] = 100.0, -100.0
    assert aggregate("trimmed_mean", y, trim=0.1).trimmed == [0, 9]
    # Cut in exactly half of the coordinates: not "more than half".
    y[3, 1], y[7, 1] = 100.0, -100.0
    assert aggregate("trimmed_mean", y, trim=0.1).trimmed == []
    y[3, 2], y[7, 2] = 100.0, -100.0
    assert aggregate("trimmed_mean", y, trim=0.1).trimmed == [3, 7]


@pytest.mark.parametrize("trim", [-0.1, 0.5, 0.7, math.nan])
def test_trim_out_of_range(trim: float) -> None:
    with pytest.raises(ValueError, match="trim must be in"):
        trimmed_mean(np.ones((5, 2)), trim)


def test_rejects_bad_matrices() -> None:
    for bad in (np.ones(3), np.ones((0, 2)), np.array([[1.0, np.nan], [0.0, 1.0]])):
        with pytest.raises(ValueError):
            coordinate_median(bad)


def _honest_and_flipped(n: int, flipped: int, d: int, seed: int) -> tuple[np.ndarray, list[int], np.ndarray]:
    """Updates around a common direction; `flipped` of the sites send -10 x their honest update."""
    gen = np.random.default_rng(seed)
    honest = gen.normal(size=d) + 0.1 * gen.normal(size=(n, d))
    bad = sorted(gen.choice(n, size=flipped, replace=False).tolist())
    x = honest.copy()
    for i in bad:
        x[i] = attack({"w": honest[i]}, Attack.SIGN_FLIP, seed=seed, round_number=0, site=str(i))["w"]
    good = [i for i in range(n) if i not in bad]
    return x, bad, honest[good].mean(axis=0)


@pytest.mark.parametrize("seed", range(5))
def test_median_and_trimmed_mean_resist_two_flipped_of_ten(seed: int) -> None:
    x, _, target = _honest_and_flipped(10, 2, 20, seed)
    scale = np.linalg.norm(target)
    assert np.linalg.norm(x.mean(axis=0) - target) > scale  # the plain mean is dragged far off
    assert np.linalg.norm(coordinate_median(x) - target) < 0.1 * scale
    assert np.linalg.norm(trimmed_mean(x, 0.2) - target) < 0.1 * scale


# --- Krum and multi-Krum ----------------------------------------------------------------------


@SETTINGS
@given(krum_cases())
def test_krum_matches_brute_force(case: tuple[np.ndarray, int, int]) -> None:
    x, f, m = case
    rows = x.tolist()
    n = len(rows)
    assert krum_scores(x, f).tolist() == ref_scores(rows, f, list(range(n)))
    assert krum(x, f) == [ref_argmin(ref_scores(rows, f, list(range(n))))]
    assert multi_krum(x, f, m) == ref_multi_krum(rows, f, m)
    assert multi_krum(x, f) == ref_multi_krum(rows, f, n - f)


@pytest.mark.parametrize("seed", range(10))
def test_exact_ties_under_rounding_go_to_the_lowest_index(seed: int) -> None:
    """Rows closed under reversing the coordinates: mirrored rows tie exactly, though the Gram
    matrix sums their products in another order; the exact (Fraction) reference decides."""
    gen = np.random.default_rng(seed)
    a, b = 1e3 + gen.normal(size=(2, 64))
    c = gen.normal(size=64)
    c = c + c[::-1]  # its own mirror image
    x = np.array([c, a, b[::-1], a[::-1], b, c * 0.5, c * 2.0])
    rows = [[Fraction(v) for v in row] for row in x.tolist()]
    for f in (0, 1, 2):
        assert krum(x, f) == [ref_argmin(ref_scores(rows, f, list(range(7))))]
        assert multi_krum(x, f) == ref_multi_krum(rows, f, 7 - f)


@pytest.mark.parametrize("seed", range(5))
def test_krum_is_exact_far_from_the_origin(seed: int) -> None:
    """A large common component must not swamp the small differences (|a|^2 + |b|^2 - 2ab cancels)."""
    gen = np.random.default_rng(seed)
    x = 1e8 + gen.normal(size=(9, 40))
    rows = [[Fraction(v) for v in row] for row in x.tolist()]
    for f in (1, 3):
        exact = ref_scores(rows, f, list(range(9)))
        np.testing.assert_allclose(krum_scores(x, f), [float(s) for s in exact], rtol=1e-6)
        assert krum(x, f) == [ref_argmin(exact)]
        assert multi_krum(x, f) == ref_multi_krum(rows, f, 9 - f)


def test_identical_updates_go_in_index_order() -> None:
    x = np.full((7, 3), 0.1)
    assert krum(x, 2) == [0]
    assert multi_krum(x, 2) == [0, 1, 2, 3, 4]
    assert multi_krum(x, 2, 7) == list(range(7))


@pytest.mark.parametrize("kind", [Attack.SIGN_FLIP, Attack.GAUSSIAN])
@pytest.mark.parametrize("seed", range(4))
def test_krum_picks_honest_updates_under_attack(kind: Attack, seed: int) -> None:
    n, f, d = 10, 3, 50
    gen = np.random.default_rng(seed)
    honest = gen.normal(size=d) + 0.3 * gen.normal(size=(n, d))
    x = honest.copy()
    bad = sorted(gen.choice(n, size=f, replace=False).tolist())
    for i in bad:
        x[i] = attack({"w": honest[i]}, kind, seed=seed, round_number=1, site=f"site-{i}")["w"]
    good = set(range(n)) - set(bad)
    assert krum(x, f)[0] in good
    assert set(multi_krum(x, f)) == good  # default m = n - f: exactly the honest ones
    # Colluding attackers sending one identical update: still only honest rows.
    x[bad] = -10.0 * honest.mean(axis=0)
    assert krum(x, f)[0] in good
    assert set(multi_krum(x, f)) == good
    result = aggregate("multi_krum", x, byzantine=f)
    assert sorted(result.selected) == sorted(good) and result.trimmed == bad
    np.testing.assert_allclose(result.update, x[result.selected].mean(axis=0))


@pytest.mark.parametrize(("n", "f"), [(2, 0), (4, 1), (6, 2), (5, -1)])
def test_krum_needs_2f_plus_3(n: int, f: int) -> None:
    x = np.arange(n * 2, dtype=np.float64).reshape(n, 2)
    for call in (krum, krum_scores, multi_krum):
        with pytest.raises(ValueError, match=f"n={n}, f={f}"):
            call(x, f)
    with pytest.raises(ValueError, match=f"n={n}, f={f}"):
        aggregate("krum", x, byzantine=f)


def test_multi_krum_m_in_range() -> None:
    for m in (0, 6):
        with pytest.raises(ValueError, match="m in"):
            multi_krum(np.eye(5), 1, m)


def test_aggregate_rules() -> None:
    x = np.array([[0.0, 1.0], [1.0, 2.0], [2.0, 3.0], [3.0, 4.0], [100.0, -100.0]])
    mean = aggregate("mean", x)
    np.testing.assert_array_equal(mean.update, x.mean(axis=0))
    assert mean.selected == [0, 1, 2, 3, 4] and mean.trimmed == []
    median = aggregate("median", x)
    np.testing.assert_array_equal(median.update, [2.0, 2.0])
    assert median.selected == [] and median.trimmed == []
    k = aggregate("krum", x, byzantine=1)
    assert k.selected == [1] and k.trimmed == [0, 2, 3, 4]
    np.testing.assert_array_equal(k.update, x[1])
    with pytest.raises(ValueError, match="unknown robust aggregation rule 'bulyan'"):
        aggregate("bulyan", x)


# --- simulated Byzantine sites ---------------------------------------------------------------


@SETTINGS
@given(st.integers(0, 40), st.integers(0, 100), st.integers(0, 2**32), st.integers(0, 1000))
def test_attackers_count_and_determinism(n: int, percent: int, seed: int, round_number: int) -> None:
    sampled = [f"site-{i}" for i in range(n)]
    fraction = percent / 100
    chosen = attackers(sampled, fraction, seed=seed, round_number=round_number)
    assert len(chosen) == math.floor(Fraction(percent, 100) * n)
    assert chosen <= set(sampled)
    assert attackers(sampled[::-1], fraction, seed=seed, round_number=round_number) == chosen


def test_attackers_vary_across_rounds_and_seeds() -> None:
    sampled = [f"site-{i}" for i in range(20)]
    by_round = [frozenset(attackers(sampled, 0.25, seed=7, round_number=r)) for r in range(10)]
    assert len(set(by_round)) > 5
    by_seed = {frozenset(attackers(sampled, 0.25, seed=s, round_number=3)) for s in range(10)}
    assert len(by_seed) > 5
    assert attackers(sampled, 0.29, seed=1, round_number=0) == attackers(
        sampled, 0.29, seed=1, round_number=0
    )
    assert len(attackers([f"s{i}" for i in range(100)], 0.29, seed=1, round_number=0)) == 29


def test_attackers_rejects_bad_input() -> None:
    for fraction in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="fraction"):
            attackers(["a", "b"], fraction, seed=0, round_number=0)
    with pytest.raises(ValueError, match="distinct"):
        attackers(["a", "a"], 0.5, seed=0, round_number=0)


def _update() -> dict[str, np.ndarray]:
    gen = np.random.default_rng(3)
    return {
        "w": gen.normal(size=(3, 4)).astype(np.float32),
        "b": gen.normal(size=5),
        "steps": np.array(12, dtype=np.int64),
    }


def _norm(arrays: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in arrays.values()))


def _check_like(out: dict[str, np.ndarray], update: dict[str, np.ndarray]) -> None:
    assert list(out) == list(update)
    for k, v in update.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
    np.testing.assert_array_equal(out["steps"], update["steps"])  # not floating: sent as is


def test_sign_flip() -> None:
    update = _update()
    before = {k: v.copy() for k, v in update.items()}
    out = attack(update, Attack.SIGN_FLIP, seed=0, round_number=0, site="s")
    _check_like(out, update)
    np.testing.assert_array_equal(out["w"], np.float32(-10.0) * update["w"])
    np.testing.assert_array_equal(out["b"], -10.0 * update["b"])
    assert all(np.array_equal(update[k], before[k]) for k in update)  # the input is untouched


def test_zero() -> None:
    update = _update()
    out = attack(update, "zero", seed=0, round_number=0, site="s")  # type: ignore[arg-type]
    _check_like(out, update)
    assert not out["w"].any() and not out["b"].any()


def test_gaussian_norm_and_seeding() -> None:
    update = {"a": np.random.default_rng(1).normal(size=(4, 6)), "b": np.arange(3.0)}
    out = attack(update, Attack.GAUSSIAN, seed=5, round_number=2, site="s1")
    assert _norm(out) == pytest.approx(10 * _norm(update), rel=1e-9)
    for k in update:
        assert out[k].dtype == np.float64 and out[k].shape == update[k].shape
    again = attack(update, Attack.GAUSSIAN, seed=5, round_number=2, site="s1")
    assert all(np.array_equal(out[k], again[k]) for k in out)
    for other in ({"round_number": 3, "site": "s1"}, {"round_number": 2, "site": "s2"}):
        changed = attack(update, Attack.GAUSSIAN, seed=5, **other)  # type: ignore[arg-type]
        assert not np.array_equal(changed["a"], out["a"])
    assert not np.allclose(out["a"] / np.linalg.norm(out["a"]), update["a"] / np.linalg.norm(update["a"]))
    # Mixed dtypes: float32 rounding limits the precision; other dtypes are untouched.
    mixed = _update()
    noisy = attack(mixed, Attack.GAUSSIAN, seed=5, round_number=2, site="s1")
    _check_like(noisy, mixed)
    floats = {k: v for k, v in mixed.items() if k != "steps"}
    assert _norm({k: noisy[k] for k in floats}) == pytest.approx(10 * _norm(floats), rel=1e-6)
    zero = attack({"a": np.zeros(4)}, Attack.GAUSSIAN, seed=5, round_number=2, site="s1")
    assert not zero["a"].any()
