"""fedcore.tasks.partition: parsing partition specs and splitting labelled data across sites."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.tasks.partition import Partition, PartitionKind, parse_partition, split_indices

# --- parse_partition ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("iid", Partition(PartitionKind.IID)),
        ("  IID ", Partition(PartitionKind.IID)),
        ("natural", Partition(PartitionKind.NATURAL)),
        ("dirichlet:0.5", Partition(PartitionKind.DIRICHLET, alpha=0.5)),
        ("Dirichlet:1e-3", Partition(PartitionKind.DIRICHLET, alpha=1e-3)),
        ("dirichlet:100", Partition(PartitionKind.DIRICHLET, alpha=100.0)),
        ("shards:1", Partition(PartitionKind.SHARDS, shards=1)),
        ("SHARDS:12", Partition(PartitionKind.SHARDS, shards=12)),
    ],
)
def test_accepted_forms(text: str, expected: Partition) -> None:
    parsed = parse_partition(text)
    assert parsed == expected
    assert parse_partition(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "unknown partition"),
        ("random", "unknown partition 'random'"),
        ("dirichlet", "bad partition"),
        ("dirichlet:", "bad partition"),
        ("dirichlet:0", "bad partition"),
        ("dirichlet:-0.5", "bad partition"),
        ("dirichlet:abc", "bad partition"),
        ("dirichlet:nan", "bad partition"),
        ("dirichlet:inf", "bad partition"),
        ("shards", "bad partition"),
        ("shards:0", "bad partition"),
        ("shards:-2", "bad partition"),
        ("shards:1.5", "bad partition"),
        ("shards:two", "bad partition"),
        ("iid:3", "takes no argument"),
        ("natural:x", "takes no argument"),
    ],
)
def test_rejected_forms(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_partition(text)
    assert "dirichlet:ALPHA" in str(info.value), "the error says what is accepted"


@given(alpha=st.floats(1e-6, 1e6), shards=st.integers(1, 10**6))
def test_parse_reads_numbers(alpha: float, shards: int) -> None:
    assert parse_partition(f"dirichlet:{alpha!r}").alpha == alpha
    assert parse_partition(f"shards:{shards}").shards == shards


# --- split_indices -----------------------------------------------------------------------


@st.composite
def labelled(draw: st.DrawFn, *, per_site: int) -> tuple[np.ndarray, int]:
    """Labels over 1..6 classes and a number of sites with at least `per_site` examples each."""
    sites = draw(st.integers(1, 6), label="sites")
    n = draw(st.integers(sites * per_site, 240), label="n")
    classes = draw(st.integers(1, 6), label="classes")
    seed = draw(st.integers(0, 2**32 - 1), label="label seed")
    labels = np.random.default_rng(seed).integers(0, classes, n)
    return labels, sites


def check_split(parts: list[np.ndarray], n: int, sites: int) -> None:
    assert len(parts) == sites
    for p in parts:
        assert p.dtype.kind == "i"
        assert len(p) > 0, "every site holds data"
        assert np.all(np.diff(p) > 0), "sorted, no repeats within a site"
    everything = np.concatenate(parts)
    assert len(everything) == n, "disjoint: no index is dealt twice"
    np.testing.assert_array_equal(np.sort(everything), np.arange(n))  # covers all


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@settings(max_examples=60)
@given(data=labelled(per_site=2), seed=st.integers(0, 2**32 - 1), min_size=st.integers(1, 2))
def test_iid(data: tuple[np.ndarray, int], seed: int, min_size: int) -> None:
    labels, sites = data
    partition = parse_partition("iid")
    parts = split_indices(labels, sites, partition, np.random.default_rng(seed), min_size=min_size)
    check_split(parts, len(labels), sites)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1, "iid sites are as equal as possible"
    assert same(
        parts, split_indices(labels, sites, partition, np.random.default_rng(seed), min_size=min_size)
    )


@settings(max_examples=60, deadline=None)
@given(
    data=labelled(per_site=20),
    alpha=st.floats(0.3, 10),
    seed=st.integers(0, 2**32 - 1),
    min_size=st.integers(1, 4),
)
def test_dirichlet(data: tuple[np.ndarray, int], alpha: float, seed: int, min_size: int) -> None:
    labels, sites = data
    partition = Partition(PartitionKind.DIRICHLET, alpha=alpha)
    parts = split_indices(labels, sites, partition, np.random.default_rng(seed), min_size=min_size)
    check_split(parts, len(labels), sites)
    assert min(len(p) for p in parts) >= min_size
    assert same(
        parts, split_indices(labels, sites, partition, np.random.default_rng(seed), min_size=min_size)
    )


@settings(max_examples=60)
@given(
    sites=st.integers(1, 6),
    k=st.integers(1, 4),
    classes=st.integers(1, 6),
    extra=st.integers(0, 60),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_shards(sites: int, k: int, classes: int, extra: int, seed: int, data: st.DataObject) -> None:
    n = sites * k + extra
    labels = data.draw(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n).map(np.array))
    partition = Partition(PartitionKind.SHARDS, shards=k)
    parts = split_indices(labels, sites, partition, np.random.default_rng(seed), min_size=1)
    check_split(parts, n, sites)
    assert same(parts, split_indices(labels, sites, partition, np.random.default_rng(seed), min_size=1))
    # Each site holds k shards: k contiguous runs of the examples sorted by label.
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(labels, kind="stable")] = np.arange(n)
    shard_sizes = {len(s) for s in np.array_split(np.arange(n), sites * k)}
    counts = np.bincount(labels)
    narrow = max(shard_sizes) <= counts[counts > 0].min()
    for p in parts:
        runs = 1 + np.count_nonzero(np.diff(np.sort(rank[p])) != 1)
        assert runs <= k
        assert min(shard_sizes) * k <= len(p) <= max(shard_sizes) * k
        if narrow:  # a shard no larger than the smallest class spans at most two labels
            assert len(np.unique(labels[p])) <= 2 * k


@settings(max_examples=30)
@given(
    sites=st.integers(1, 8), k=st.integers(1, 4), per_class=st.integers(1, 20), seed=st.integers(0, 2**32 - 1)
)
def test_shards_aligned_with_classes_give_exactly_k_labels(
    sites: int, k: int, per_class: int, seed: int
) -> None:
    # sites x k classes of equal size: every shard is exactly one class.
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(sites * k), per_class))
    parts = split_indices(
        labels, sites, Partition(PartitionKind.SHARDS, shards=k), np.random.default_rng(seed), min_size=1
    )
    check_split(parts, len(labels), sites)
    for p in parts:
        assert len(np.unique(labels[p])) == k
        assert np.all(np.bincount(labels[p]) % per_class == 0)


PARTITIONS = ["iid", "dirichlet:0.5", "dirichlet:5", "shards:2"]


@pytest.mark.parametrize("text", PARTITIONS)
def test_different_seeds_give_different_splits(text: str) -> None:
    labels = np.random.default_rng(0).integers(0, 10, 300)
    splits = [split_indices(labels, 4, parse_partition(text), np.random.default_rng(s)) for s in range(10)]
    distinct = [s for i, s in enumerate(splits) if not any(same(s, t) for t in splits[:i])]
    assert len(distinct) >= 8


def test_dirichlet_small_alpha_is_skewed_and_large_alpha_is_balanced() -> None:
    labels = np.repeat(np.arange(10), 100)
    rng = np.random.default_rng(3)

    def skew(alpha: float) -> float:
        parts = split_indices(labels, 5, Partition(PartitionKind.DIRICHLET, alpha=alpha), rng)
        shares = np.array([np.bincount(labels[p], minlength=10) / len(p) for p in parts])
        return float(np.abs(shares - 0.1).sum(axis=1).mean())  # distance from the global mix

    assert skew(0.1) > 3 * skew(100.0)


@pytest.mark.parametrize(
    ("n", "sites", "min_size"),
    [(10, 0, 2), (10, 6, 2), (9, 3, 4), (0, 1, 1)],
)
def test_too_few_examples(n: int, sites: int, min_size: int) -> None:
    labels = np.zeros(n, dtype=np.int64)
    for text in ("iid", "dirichlet:1", "shards:1"):
        with pytest.raises(ValueError, match="cannot split"):
            split_indices(labels, sites, parse_partition(text), np.random.default_rng(0), min_size=min_size)


def test_too_many_shards() -> None:
    with pytest.raises(ValueError, match="needs 12 shards but there are 10 examples"):
        split_indices(np.zeros(10, np.int64), 4, parse_partition("shards:3"), np.random.default_rng(0))


def test_natural_cannot_split_generic_data() -> None:
    with pytest.raises(ValueError, match="natural"):
        split_indices(np.zeros(10, np.int64), 2, parse_partition("natural"), np.random.default_rng(0))


def test_impossible_dirichlet_says_what_to_do() -> None:
    # 12 examples of one class over 6 sites, 2 each: Dir(0.01) essentially never spreads them.
    with pytest.raises(ValueError, match="use fewer sites or a larger alpha"):
        split_indices(np.zeros(12, np.int64), 6, parse_partition("dirichlet:0.01"), np.random.default_rng(0))
