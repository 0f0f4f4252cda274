"""Simulated Byzantine sites: which sampled sites misbehave in a round, and what they send.

Used to check that robust aggregation (fedcore.aggregation.robust) does what it claims. The
attacks are the classic baselines: a scaled sign flip (a reversed, amplified step), large
Gaussian noise of a fixed norm (Blanchard et al. 2017's "Gaussian" Byzantine workers), and a
zero update (a free rider). All choices are seeded by (seed, round[, site]), not by attempt,
so a retried round has the same attackers sending the same updates.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from fedcore.config import ByzantineAttack
from fedcore.seeding import rng

SCALE = 10.0  # how much larger than the honest update the sign-flipped / noise update is


Attack = ByzantineAttack  # sign_flip, gaussian, zero: chosen with [simulation] byzantine_attack


def attackers(sampled: list[str], fraction: float, *, seed: int, round_number: int) -> set[str]:
    """floor(fraction * len(sampled)) of the sampled sites, the same for any order of `sampled`.

    The product is rounded to 9 decimals before the floor, so that e.g. 0.29 of 100 sites is 29
    attackers rather than floor(28.999999999999996) = 28.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"byzantine fraction must be in [0, 1], got {fraction}")
    pool = sorted(sampled)
    if len(set(pool)) != len(pool):
        raise ValueError("sampled sites must be distinct")
    count = math.floor(round(fraction * len(pool), 9))
    picks = rng(seed, "byzantine", round_number).choice(len(pool), size=count, replace=False)
    return {pool[int(i)] for i in picks}


def attack(
    update: dict[str, npt.NDArray[np.generic]], kind: Attack, *, seed: int, round_number: int, site: str
) -> dict[str, npt.NDArray[np.generic]]:
    """What a Byzantine site sends instead of its honest `update` (a difference from the global model).

    sign_flip: -10 x update. gaussian: noise whose L2 norm over all arrays is 10 x the honest
    update's (exact up to rounding to each array's dtype). zero: zeros. Only floating-point arrays
    are attacked; others (counters, masks) are sent unchanged. Dtypes and shapes are kept.
    """
    kind = Attack(kind)  # also accepts the plain string value; ValueError for an unknown one
    floats = sorted(k for k, v in update.items() if np.issubdtype(v.dtype, np.floating))
    out = {k: v.copy() for k, v in update.items()}
    if kind is Attack.SIGN_FLIP:
        for k in floats:
            out[k] = (-SCALE * update[k].astype(np.float64)).astype(update[k].dtype)
    elif kind is Attack.ZERO:
        for k in floats:
            out[k] = np.zeros_like(update[k])
    else:
        gen = rng(seed, "byzantine-noise", round_number, site)
        noise = {k: gen.standard_normal(update[k].shape) for k in floats}  # sorted keys: reproducible
        honest = math.sqrt(sum(float(np.sum(np.square(update[k], dtype=np.float64))) for k in floats))
        drawn = math.sqrt(sum(float(np.sum(np.square(z))) for z in noise.values()))
        factor = SCALE * honest / drawn if drawn > 0 else 0.0
        for k in floats:
            out[k] = (noise[k] * factor).astype(update[k].dtype)
    return out
