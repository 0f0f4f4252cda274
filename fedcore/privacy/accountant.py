"""Privacy accounting with Opacus's RDP accountant: every epsilon fedcore reports comes from
here, with its delta.

A mechanism is a subsampled Gaussian mechanism applied `steps` times: DP-SGD at a site
(noise multiplier, batch sampling rate, optimizer steps) or DP-FedAvg at the server (noise
multiplier, site sampling rate, rounds). Rényi DP composes by addition, so a history of
mechanisms, within a run or across runs, is accounted as one list.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


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


def epsilon(history: Sequence[Mechanism], delta: float) -> float:
    """The (epsilon, delta)-DP guarantee of running every mechanism in `history`."""
    from opacus.accountants import RDPAccountant

    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    # RDP is linear in the steps of one mechanism: equal mechanisms (every round of a site's
    # ledger, typically) are accounted once with their steps summed, as Opacus's own step()
    # does, so a long ledger costs no more than a short one.
    steps: dict[tuple[float, float], int] = {}
    for m in history:
        if m.steps > 0:
            key = (m.noise_multiplier, m.sample_rate)
            steps[key] = steps.get(key, 0) + m.steps
    if not steps:
        return 0.0
    from opacus.accountants.analysis.rdp import get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    # Opacus's RDPAccountant.get_epsilon, with each mechanism's per-step RDP computed once.
    rdp = sum(np.asarray(_rdp_per_step(z, q)) * n for (z, q), n in steps.items())
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
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, prior: tuple[Mechanism, ...] = ()
) -> float:
    """The smallest noise multiplier whose `steps` steps stay within `target_epsilon`, with
    the `prior` mechanisms (e.g. a statistics release) composed in."""
    from opacus.accountants.utils import get_noise_multiplier

    if prior:
        if epsilon(prior, delta) >= target_epsilon:
            raise ValueError(f"the target epsilon {target_epsilon} leaves nothing after {list(prior)}")

        def within(z: float) -> bool:
            return epsilon([*prior, Mechanism(z, sample_rate, steps)], delta) <= target_epsilon

        low, high = 0.0, 1.0
        while not within(high):
            low, high = high, 2 * high
        while high - low > 1e-4 * high:  # the same precision as Opacus's search
            low, high = (low, (low + high) / 2) if within((low + high) / 2) else ((low + high) / 2, high)
        return high

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
        )
    return float(value)


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
