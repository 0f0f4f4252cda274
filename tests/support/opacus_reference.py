"""Independent references every fedcore epsilon is tested against: Opacus's RDP accountant,
Google's dp-accounting PLD accountant called directly, and the Gaussian mechanism's exact
(epsilon, delta) curve (Balle and Wang 2018). None goes through fedcore's code."""

from __future__ import annotations

import math
import warnings


def opacus_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of (noise multiplier, sample rate, steps) mechanisms by Opacus's RDPAccountant."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = history
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta))


def pld_epsilon(
    history: list[tuple[float, float, int]], delta: float, *, replace: bool = False, interval: float = 1e-3
) -> float:
    """The same by dp-accounting's PLDAccountant, event by event (no grouping)."""
    from dp_accounting import dp_event, privacy_accountant
    from dp_accounting.pld import pld_privacy_accountant

    relation = privacy_accountant.NeighboringRelation
    accountant = pld_privacy_accountant.PLDAccountant(
        relation.REPLACE_ONE if replace else relation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=interval,
    )
    for z, q, steps in history:
        event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z))
        accountant.compose(event, steps)
    return float(accountant.get_epsilon(delta))


def gaussian_epsilon(noise_multiplier: float, steps: int, delta: float) -> float:
    """The exact epsilon of `steps` Gaussian mechanisms at this noise multiplier (their
    composition is one with mu = sqrt(steps) / z): delta(eps) = Phi(mu/2 - eps/mu) -
    e^eps Phi(-mu/2 - eps/mu), solved by bisection."""
    mu = math.sqrt(steps) / noise_multiplier

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def delta_at(eps: float) -> float:
        return phi(mu / 2 - eps / mu) - math.exp(eps) * phi(-mu / 2 - eps / mu)

    low, high = 0.0, 1.0
    while delta_at(high) > delta:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if delta_at(middle) > delta else (low, middle)
    return high
