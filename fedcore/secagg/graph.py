"""The sparse neighbour graph of SecAgg+ (Bell et al. 2020): each site shares its secrets
with, and masks against, only k neighbours instead of all n - 1 sites."""

from __future__ import annotations

import math

from fedcore.seeding import rng


def neighbour_graph(
    sites: list[str], degree: int, *, seed: int, round_number: int
) -> dict[str, frozenset[str]]:
    """A k-regular circulant graph over a seeded random order of the sites (a Harary graph
    after a random permutation): each site is joined to the degree // 2 sites on either
    side. The order is public: it decides who masks against whom, not any secret."""
    n = len(sites)
    degree = min(degree, n - 1)
    if degree % 2 and n % 2:  # a k-regular graph on n nodes needs n*k even
        degree -= 1
    order = [sites[i] for i in rng(seed, "secagg-graph", round_number).permutation(n)]
    graph: dict[str, set[str]] = {s: set() for s in sites}
    for position, site in enumerate(order):
        for step in range(1, degree // 2 + 1):
            other = order[(position + step) % n]
            graph[site].add(other)
            graph[other].add(site)
        if degree % 2:  # n is even: join the opposite site
            other = order[(position + n // 2) % n]
            graph[site].add(other)
            graph[other].add(site)
    return {s: frozenset(p - {s}) for s, p in graph.items()}


def default_degree(n: int) -> int:
    """Bell et al. need k = O(log n) for security and dropout tolerance; we use a generous
    constant times log2(n), capped at n - 1 (small federations: everyone is a neighbour)."""
    return int(min(n - 1, max(4, 3 * math.ceil(math.log2(max(n, 2))))))


def default_threshold(degree: int) -> int:
    """A strict majority of a site's neighbourhood counted with itself (2t >= k + 2, what
    every site checks): a site's secrets survive while such a majority of its neighbours
    does, and no two disjoint groups of the neighbourhood can each reach t."""
    return (degree + 3) // 2
