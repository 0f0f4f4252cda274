"""Opacus's own RDP accountant, as the reference every fedcore epsilon is tested against."""

from __future__ import annotations

import warnings


def opacus_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of (noise multiplier, sample rate, steps) mechanisms by Opacus's RDPAccountant."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = history
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta))
