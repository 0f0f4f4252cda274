"""Split a labelled data set across sites: `iid`, `dirichlet:ALPHA`, `shards:K`, `natural`."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np


class PartitionKind(enum.StrEnum):
    IID = "iid"
    DIRICHLET = "dirichlet"
    SHARDS = "shards"
    NATURAL = "natural"  # the data set's own split (one device per site), where it has one


@dataclass(frozen=True)
class Partition:
    kind: PartitionKind
    alpha: float = 0.0  # dirichlet concentration
    shards: int = 0  # shards per site

    def __str__(self) -> str:
        if self.kind is PartitionKind.DIRICHLET:
            return f"dirichlet:{self.alpha:g}"
        if self.kind is PartitionKind.SHARDS:
            return f"shards:{self.shards}"
        return self.kind.value


def parse_partition(text: str) -> Partition:
    """Parse `iid`, `dirichlet:0.5`, `shards:2` or `natural`; ValueError says what is accepted."""
    kind, _, arg = text.strip().lower().partition(":")
    usage = "use iid, dirichlet:ALPHA (ALPHA > 0), shards:K (K >= 1) or natural"
    try:
        parsed = PartitionKind(kind)
    except ValueError:
        raise ValueError(f"unknown partition {text!r}; {usage}") from None
    try:
        if parsed is PartitionKind.DIRICHLET:
            alpha = float(arg)
            if not 0 < alpha < math.inf:  # also refuses nan
                raise ValueError
            return Partition(parsed, alpha=alpha)
        if parsed is PartitionKind.SHARDS:
            shards = int(arg)
            if shards < 1:
                raise ValueError
            return Partition(parsed, shards=shards)
    except ValueError:
        raise ValueError(f"bad partition {text!r}; {usage}") from None
    if arg:
        raise ValueError(f"partition {kind!r} takes no argument; {usage}")
    return Partition(parsed)


def split_indices(
    labels: np.ndarray,
    sites: int,
    partition: Partition,
    rng: np.random.Generator,
    *,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Indices of `labels` for each of `sites` sites (sorted within each site)."""
    n = len(labels)
    if sites < 1 or sites * min_size > n:
        raise ValueError(f"cannot split {n} examples across {sites} sites (at least {min_size} each)")
    if partition.kind is PartitionKind.IID:
        parts = np.array_split(rng.permutation(n), sites)
    elif partition.kind is PartitionKind.DIRICHLET:
        parts = _dirichlet(labels, sites, partition.alpha, rng, min_size)
    elif partition.kind is PartitionKind.SHARDS:
        parts = _shards(labels, sites, partition.shards, rng)
    else:
        raise ValueError("the natural partition exists only for data sets with their own split")
    return [np.sort(p) for p in parts]


def _dirichlet(
    labels: np.ndarray, sites: int, alpha: float, rng: np.random.Generator, min_size: int
) -> list[np.ndarray]:
    """Per class, proportions over sites ~ Dir(alpha) (Hsu et al. 2019); redrawn until every
    site holds at least `min_size` examples."""
    classes = np.unique(labels)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(sites)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(sites, alpha)))[:-1] * len(idx)).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.asarray(p, dtype=np.int64) for p in parts]
    raise ValueError(
        f"dirichlet:{alpha:g} left a site with fewer than {min_size} examples in 1000 draws; "
        "use fewer sites or a larger alpha"
    )


def _shards(labels: np.ndarray, sites: int, per_site: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Sort by label, cut into sites x per_site shards, deal each site `per_site` at random
    (McMahan et al. 2017's pathological non-IID split)."""
    count = sites * per_site
    if count > len(labels):
        raise ValueError(f"shards:{per_site} needs {count} shards but there are {len(labels)} examples")
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, count)
    dealt = rng.permutation(count)
    return [
        np.concatenate([shards[s] for s in dealt[i * per_site : (i + 1) * per_site]]) for i in range(sites)
    ]
