"""The sparse neighbour graph of SecAgg+ (Bell et al. 2020): each site shares its secrets
with, and masks against, only k neighbours instead of all n - 1 sites.

The graph is a public function of the round's session (run, round, attempt), the beacon,
its participants and its degree (`RoundParams.neighbours`). The beacon hashes the nonces
the sites committed to at advertise and revealed once the server had fixed the participant
set (`fedcore.secagg.stages.reveal`): the server cannot know an honest site's nonce when it
fixes the set, so it cannot search sessions or participant sets offline for a draw it likes,
and every site computes the graph itself, so it cannot pass another. It can re-roll the draw
only by aborting an attempt after the reveal, and each site takes part in at most
`max_attempts` attempts of a round (`SecAggClient`)."""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping

import numpy as np


@functools.lru_cache(maxsize=64)  # every site of a simulated round checks the same graph
def _graph(sites: tuple[str, ...], degree: int, session: str) -> Mapping[str, frozenset[str]]:
    n = len(sites)
    degree = min(degree, n - 1)
    if degree % 2 and n % 2:  # a k-regular graph on n nodes needs n*k even
        degree -= 1
    seed = int.from_bytes(hashlib.sha256(f"fedcore secagg+ graph|{session}".encode()).digest())
    order = [sites[i] for i in np.random.default_rng(seed).permutation(n)]
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


def neighbour_graph(
    sites: list[str] | tuple[str, ...], degree: int, *, session: str
) -> dict[str, frozenset[str]]:
    """A k-regular circulant graph over an order of the sites drawn from the session (a
    Harary graph after a public random permutation): each site is joined to the degree // 2
    sites on either side. The order decides who masks against whom, not any secret."""
    return dict(_graph(tuple(sorted(sites)), degree, session))


def default_degree(n: int) -> int:
    """Bell et al. need k = O(log n) for security and dropout tolerance; we use a generous
    constant times log2(n), capped at n - 1 (small federations: everyone is a neighbour).
    Sites refuse a smaller degree."""
    return int(min(n - 1, max(4, 3 * math.ceil(math.log2(max(n, 2))))))


def default_threshold(degree: int) -> int:
    """A strict majority of a site's neighbourhood counted with itself (2t >= k + 2, what
    every site checks): a site's secrets survive while such a majority of its neighbours
    does, and no two disjoint groups of the neighbourhood can each reach t."""
    return (degree + 3) // 2


SECURITY_BITS = 40  # the statistical security of the threshold rule: 2**-40 per round


def colluders(n: int, colluding_fraction: float) -> int:
    """How many of n participants a fraction of colluding sites is (rounded down)."""
    return math.floor(colluding_fraction * n + 1e-9)


@functools.lru_cache(maxsize=256)
def safe_threshold(n: int, degree: int, colluding_fraction: float, *, attempts: int) -> int | None:
    """The smallest threshold t (at least `default_threshold`) that keeps every honest site's
    input from a malicious server with colluders(n, fraction) colluding participants, except
    with probability 2**-SECURITY_BITS over the `attempts` graphs it can draw for a round.

    A split of survivor views that recovers an input needs some honest site (the target, or
    a neighbour it masked against) to have 2t - k - 1 of them among its k neighbours, signing
    both views (t of them rebuild a site's secrets outright: more). The fraction is rounded
    down: below 1 / fraction participants it assumes none. The beacon draws the graph after the participants are
    fixed, so those k neighbours are a uniform k-subset of the other n - 1 sites, and how
    many colluders they hold is hypergeometric; the tail is summed exactly, in integers, and
    bounded over every honest site and attempt. None: no t up to k is enough (raise k)."""
    bad = colluders(n, colluding_fraction)
    others = n - 1
    draws = math.comb(others, degree)
    for t in range(default_threshold(degree), degree + 1):
        split = 2 * t - degree - 1
        if split > bad:
            return t
        tail = sum(
            math.comb(bad, j) * math.comb(others - bad, degree - j)
            for j in range(split, min(bad, degree) + 1)
        )
        if tail * (n - bad) * attempts * 2**SECURITY_BITS <= draws:
            return t
    return None
