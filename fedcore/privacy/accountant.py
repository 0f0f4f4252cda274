"""Privacy accounting: every epsilon fedcore reports comes from here, with its delta, its
accountant and its neighbouring relation.

A mechanism is a subsampled Gaussian mechanism applied `steps` times: DP-SGD at a site
(noise multiplier, batch sampling rate, optimizer steps) or DP-FedAvg at the server (noise
multiplier, site sampling rate, rounds). A history of mechanisms, within a run or across
runs, is accounted as one composition, by either accountant:
- PLD (`Accountant.PLD`, the default): Google's dp-accounting privacy loss distributions,
  pessimistic (an upper bound) at a value discretisation of `PLD_INTERVAL`; add-remove or
  replace-one neighbours, Poisson subsampling included;
- RDP (`Accountant.RDP`): Opacus's Renyi-DP accountant; add-remove neighbours (replace-one
  only without subsampling, as the Gaussian mechanism at twice the sensitivity).
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcore.config import Accountant, Adjacency

log = logging.getLogger(__name__)

PLD_INTERVAL = 1e-3  # dp-accounting's value discretisation: coarser is faster and looser, never optimistic


@dataclass(frozen=True)
class Mechanism:
    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


Groups = tuple[tuple[float, float, int], ...]  # (noise multiplier, sample rate, steps), sorted


def _groups(history: Sequence[Mechanism]) -> Groups:
    """Equal mechanisms merged, their steps summed (every round of a ledger, typically): a
    long history costs no more than a short one, and equal histories share a cache entry."""
    steps: dict[tuple[float, float], int] = {}
    for m in history:
        if m.steps > 0:
            key = (m.noise_multiplier, m.sample_rate)
            steps[key] = steps.get(key, 0) + m.steps
    return tuple(sorted((z, q, n) for (z, q), n in steps.items()))


def epsilon(
    history: Sequence[Mechanism],
    delta: float,
    accountant: Accountant = Accountant.PLD,
    adjacency: Adjacency = Adjacency.ADD_REMOVE,
) -> float:
    """The (epsilon, delta)-DP guarantee of running every mechanism in `history`, for
    neighbours related by `adjacency` (zero-out is add-remove's arithmetic: the same
    sensitivity, the count public)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    groups = _groups(history)
    if not groups:
        return 0.0
    replace = adjacency is Adjacency.REPLACE_ONE
    if accountant is Accountant.PLD:
        try:
            return _pld_epsilon(groups, delta, replace)
        except (ValueError, OverflowError, MemoryError) as err:
            # Noise so small that the loss distribution cannot be built (e.g. a multiplier of
            # 1e-12): RDP's bound is valid too, or there is none.
            log.warning("PLD accounting failed (%s): using RDP's bound", err)
            try:
                return _rdp_epsilon(groups, delta, replace)
            except ValueError:
                return math.inf
    return _rdp_epsilon(groups, delta, replace)


@functools.lru_cache(maxsize=4096)
def _pld_epsilon(groups: Groups, delta: float, replace: bool) -> float:
    from dp_accounting import dp_event, privacy_accountant
    from dp_accounting.pld import pld_privacy_accountant

    relation = privacy_accountant.NeighboringRelation
    pld = pld_privacy_accountant.PLDAccountant(
        relation.REPLACE_ONE if replace else relation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=PLD_INTERVAL,
    )
    for z, q, n in groups:
        gaussian = dp_event.GaussianDpEvent(z)
        pld.compose(gaussian if q == 1 else dp_event.PoissonSampledDpEvent(q, gaussian), n)
    return float(pld.get_epsilon(delta))


@functools.lru_cache(maxsize=4096)
def _rdp_epsilon(groups: Groups, delta: float, replace: bool) -> float:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    if replace and any(q < 1 for _, q, _ in groups):
        raise ValueError(
            "the RDP accountant has no replace-one bound for subsampling: use the PLD accountant"
        )
    orders = RDPAccountant.DEFAULT_ALPHAS
    # Replace-one without subsampling: the Gaussian mechanism at twice the sensitivity.
    rdp = sum(np.asarray(_rdp_per_step(z / 2 if replace else z, q)) * n for z, q, n in groups)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    for w in caught:  # e.g. "optimal order is the largest alpha": a looser, still valid bound
        log.debug("accountant: %s", w.message)
    return float(value)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    per_step = compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    return tuple(float(v) for v in per_step)


@functools.lru_cache(maxsize=1024)
def noise_for(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: tuple[Mechanism, ...] = (),
    accountant: Accountant = Accountant.PLD,
    adjacency: Adjacency = Adjacency.ADD_REMOVE,
) -> float:
    """The smallest noise multiplier (to 1e-4 relative, rounded up) whose `steps` steps,
    with the `prior` mechanisms (e.g. a statistics release) composed in, stay within
    `target_epsilon` by `accountant`."""
    if prior and epsilon(prior, delta, accountant, adjacency) >= target_epsilon:
        raise ValueError(f"the target epsilon {target_epsilon} leaves nothing after {list(prior)}")

    def within(z: float) -> bool:
        return (
            epsilon([*prior, Mechanism(z, sample_rate, steps)], delta, accountant, adjacency)
            <= target_epsilon
        )

    low, high = 0.0, 1.0
    while not within(high):
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} at delta {delta}")
    while high - low > 1e-4 * high:  # Opacus's precision
        middle = (low + high) / 2
        low, high = (low, middle) if within(middle) else (middle, high)
    return high


def zcdp_epsilon(rho: float, delta: float) -> float:
    """Epsilon at `delta` of a rho-zCDP mechanism (RDP alpha * rho at every order alpha),
    converted with Opacus's RDP-to-(epsilon, delta) conversion over its default orders."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if rho <= 0:
        return 0.0
    orders = RDPAccountant.DEFAULT_ALPHAS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": looser, still valid
        value, _ = get_privacy_spent(orders=orders, rdp=[a * rho for a in orders], delta=delta)
    return float(value)


__all__ = ["Accountant", "Adjacency", "Mechanism", "epsilon", "noise_for", "zcdp_epsilon"]
