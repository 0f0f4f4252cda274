"""Byzantine-robust aggregation over individual site updates (one flattened update per row).

A weighted mean lets one site move the global model anywhere; these rules bound what f
misbehaving sites can do, at the price of seeing each site's update (so no SecAgg):

- coordinate-wise median and trimmed mean (Yin et al. 2018, "Byzantine-robust distributed
  learning: towards optimal statistical rates");
- Krum (Blanchard et al. 2017, "Machine learning with adversaries: Byzantine tolerant gradient
  descent") and multi-Krum chosen recursively as in El Mhamdi et al. 2018 ("The hidden
  vulnerability of distributed learning in Byzantium").

All functions take a finite float matrix of shape (n_sites, dimension) and are deterministic:
ties go to the lowest row index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Matrix = npt.NDArray[np.float64]
RULES = ("mean", "median", "trimmed_mean", "krum", "multi_krum")


@dataclass(frozen=True)
class RobustResult:
    """The aggregate, the rows that went into it, and the rows left out (see `aggregate`)."""

    update: Matrix
    selected: list[int]
    trimmed: list[int]


def _matrix(updates: npt.ArrayLike) -> Matrix:
    x = np.asarray(updates, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"updates must be a non-empty (n_sites, dimension) matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("updates must be finite")
    return x


def coordinate_median(updates: npt.ArrayLike) -> Matrix:
    """Coordinate-wise median (mean of the two middle values for even n)."""
    return np.median(_matrix(updates), axis=0)


def _trim_count(n: int, trim: float) -> int:
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    cut = int(trim * n)  # the same count as scipy.stats.trim_mean
    if n - 2 * cut < 1:
        raise ValueError(f"trim {trim} of {n} updates leaves nothing to average")
    return cut


def _trimmed(x: Matrix, trim: float) -> tuple[Matrix, list[int]]:
    n, d = x.shape
    cut = _trim_count(n, trim)
    order = np.argsort(x, axis=0, kind="stable")
    mean = np.take_along_axis(x, order, axis=0)[cut : n - cut].mean(axis=0)
    removed = np.concatenate([order[:cut], order[n - cut :]]).ravel()
    counts = np.bincount(removed, minlength=n)
    return mean, [int(i) for i in np.flatnonzero(2 * counts > d)]


def trimmed_mean(updates: npt.ArrayLike, trim: float) -> Matrix:
    """Coordinate-wise mean after cutting int(trim * n) smallest and largest values (scipy's trim_mean)."""
    return _trimmed(_matrix(updates), trim)[0]


def _check_f(n: int, f: int) -> None:
    if f < 0 or n < 2 * f + 3:
        raise ValueError(f"Krum needs n >= 2f + 3 updates and f >= 0, got n={n}, f={f}")


def _distances(x: Matrix) -> tuple[Matrix, Matrix]:
    """Pairwise squared distances from the Gram matrix, and each row's squared norm.

    Rows are first centred on the coordinate-wise median (distances do not change) so that a large
    common component does not cancel catastrophically in |a|^2 + |b|^2 - 2ab.
    """
    c = x - np.median(x, axis=0)
    sq = np.einsum("ij,ij->i", c, c)
    dist = sq[:, None] + sq[None, :] - 2.0 * (c @ c.T)
    dist = np.maximum((dist + dist.T) / 2.0, 0.0)
    np.fill_diagonal(dist, 0.0)
    return dist, sq


def _scores(dist: Matrix, k: int) -> Matrix:
    # Each sorted row starts with the row's own 0 (any other 0 is an equal value, so it does not matter which goes).
    scores: Matrix = np.sort(dist, axis=1)[:, 1 : k + 1].sum(axis=1)
    return scores


def _lowest(scores: Matrix, sq: Matrix, k: int, dimension: int) -> int:
    """Index of the lowest score; scores equal up to the Gram rounding error count as ties (lowest index wins)."""
    slack = (dimension + 4) * np.finfo(np.float64).eps * (3.0 * k * sq + 2.0 * scores)
    return int(np.flatnonzero(scores - slack <= np.min(scores + slack))[0])


def krum_scores(updates: npt.ArrayLike, f: int) -> Matrix:
    """Blanchard et al. 2017: sum of squared distances from each update to its n - f - 2 nearest others."""
    x = _matrix(updates)
    _check_f(x.shape[0], f)
    return _scores(_distances(x)[0], x.shape[0] - f - 2)


def krum(updates: npt.ArrayLike, f: int) -> list[int]:
    """The one update closest to its n - f - 2 neighbours: a Byzantine update must hide among honest ones."""
    x = _matrix(updates)
    n = x.shape[0]
    _check_f(n, f)
    dist, sq = _distances(x)
    return [_lowest(_scores(dist, n - f - 2), sq, n - f - 2, x.shape[1])]


def multi_krum(updates: npt.ArrayLike, f: int, m: int | None = None) -> list[int]:
    """Recursive Krum (El Mhamdi et al. 2018): pick the Krum winner, remove it, re-score the rest; m times.

    Each pick is Krum on the n' updates left (n' - f - 2 neighbours) while n' >= 2f + 3. Below
    that Krum is undefined or unsound (the default m = n - f gets there when f > 0: the last
    picks would be judged by a set that may be mostly Byzantine, and colluding attackers close to
    each other would win), so the remaining picks follow the full-set Krum scores instead, as
    Blanchard et al. 2017's multi-Krum ranks them. Returns indices in selection order; the
    aggregate is their mean.
    """
    x = _matrix(updates)
    n = x.shape[0]
    _check_f(n, f)
    m = n - f if m is None else m
    if not 1 <= m <= n:
        raise ValueError(f"multi-Krum selects m in [1, n={n}] updates, got m={m}")
    dist, sq = _distances(x)
    remaining = list(range(n))
    selected: list[int] = []
    while len(selected) < m and len(remaining) >= 2 * f + 3:
        k = len(remaining) - f - 2
        sub = np.ix_(remaining, remaining)
        selected.append(remaining.pop(_lowest(_scores(dist[sub], k), sq[remaining], k, x.shape[1])))
    full = _scores(dist, n - f - 2)
    while len(selected) < m:
        best = _lowest(full[remaining], sq[remaining], n - f - 2, x.shape[1])
        selected.append(remaining.pop(best))
    return selected


def aggregate(rule: str, updates: npt.ArrayLike, *, trim: float = 0.1, byzantine: int = 0) -> RobustResult:
    """Aggregate with one of `RULES`; `byzantine` is f for Krum, `trim` the fraction cut per end.

    `selected` lists the rows that went into `update` (all rows for "mean", the Krum picks for
    "krum"/"multi_krum"); `trimmed` lists the others. The coordinate-wise rules mix rows per
    coordinate, so "median" leaves both empty and "trimmed_mean" puts in `trimmed` only a summary:
    the rows cut in more than half of the coordinates (equal values are cut in stable-sort order).
    """
    x = _matrix(updates)
    n = x.shape[0]
    if rule == "mean":
        return RobustResult(x.mean(axis=0), list(range(n)), [])
    if rule == "median":
        return RobustResult(coordinate_median(x), [], [])
    if rule == "trimmed_mean":
        mean, cut = _trimmed(x, trim)
        return RobustResult(mean, [], cut)
    if rule in ("krum", "multi_krum"):
        chosen = krum(x, byzantine) if rule == "krum" else multi_krum(x, byzantine)
        rest = sorted(set(range(n)) - set(chosen))
        return RobustResult(x[chosen].mean(axis=0), chosen, rest)
    raise ValueError(f"unknown robust aggregation rule {rule!r}; known: {', '.join(RULES)}")
