"""User-level distributed DP under secure aggregation: the distributed discrete Gaussian
(Kairouz, Liu, Steinke, ICML 2021).

Each site clips its update to L2 norm `clip_norm`, scales it by `scale` into integer units,
rounds each coordinate stochastically (from the secure stream) and adds discrete Gaussian
noise N_Z(0, sigma^2) before masking. The server decrypts only the sum, which already carries
the noise of every site that sent masked input: n sites give variance n sigma^2.

Sensitivity, in integer units: the clipped, scaled vector has L2 norm at most
clip_norm x scale, and rounding moves each of the d coordinates by less than 1, so
Delta_2 = clip_norm x scale + sqrt(d) holds always (not just with high probability); the
scale is chosen so the rounding slack is 1% of the clip. For integer vectors
Delta_1 <= min(sqrt(d) Delta_2, Delta_2^2).

Accounting (Kairouz et al., Theorem 1): the sum of n i.i.d. N_Z(0, sigma^2) makes the
released sum rho-zCDP with rho = eps^2 / 2,
    eps = min( sqrt(Delta_2^2 / (n sigma^2) + tau Delta_1 / 2),  Delta_2 / (sqrt(n) sigma) + tau Delta_1 ),
    tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)).
zCDP composes over rounds by adding rho. The bound is against the server itself, which knows
who took part: no amplification by sampling is claimed. A round is accounted with the sites
whose masked input reached the sum (n), so noise lost to dropouts shows as a larger epsilon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedcore.privacy.accountant import zcdp_epsilon
from fedcore.privacy.randomness import SecureRandom
from fedcore.tensors import clip_l2

ROUNDING_SLACK = 0.01  # sqrt(d) / (clip_norm x scale): rounding's share of the sensitivity


@dataclass(frozen=True)
class DistributedNoise:
    """One round's parameters, the same for every site (sent in the fit instruction)."""

    clip_norm: float
    scale: float  # integer units per unit of the update
    sigma: float  # each site's discrete Gaussian std, in integer units

    @classmethod
    def for_model(
        cls, *, dimension: int, clip_norm: float, noise_multiplier: float, sites: int
    ) -> DistributedNoise:
        """Each of `sites` sites adds sigma so that the sum's std is noise_multiplier x Delta_2."""
        scale = math.sqrt(dimension) / (ROUNDING_SLACK * clip_norm)
        delta_2 = sensitivity_l2(dimension, clip_norm, scale)
        return cls(clip_norm, scale, noise_multiplier * delta_2 / math.sqrt(sites))


def sensitivity_l2(dimension: int, clip_norm: float, scale: float) -> float:
    return clip_norm * scale + math.sqrt(dimension)


def encode(flat: np.ndarray, noise: DistributedNoise, random: SecureRandom) -> np.ndarray:
    """A site's integer vector: [clipped, scaled, stochastically rounded update + noise, 1].
    The last entry counts the site, so the sum says how many sites' noise it carries."""
    clipped = clip_l2({"u": np.asarray(flat, dtype=np.float64)}, noise.clip_norm)[0]["u"]
    scaled = clipped * noise.scale
    floor = np.floor(scaled)
    rounded = floor.astype(np.int64) + (random.uniform(len(scaled)) < scaled - floor)
    noised = rounded + random.discrete_gaussian(len(scaled), noise.sigma)
    return np.concatenate([noised, [1]]).astype(np.int64)


def decode(total: np.ndarray, noise: DistributedNoise) -> tuple[np.ndarray, int]:
    """The (noised) sum of the sites' clipped updates and how many sites it holds."""
    total = np.asarray(total, dtype=np.int64)
    return total[:-1].astype(np.float64) / noise.scale, int(total[-1])


def round_rho(*, dimension: int, noise: DistributedNoise, sites: int) -> float:
    """zCDP rho of one round whose sum holds the noise of `sites` sites (Kairouz et al., Thm 1)."""
    if sites < 1:
        raise ValueError("a sum needs at least one site")
    delta_2 = sensitivity_l2(dimension, noise.clip_norm, noise.scale)
    delta_1 = min(math.sqrt(dimension) * delta_2, delta_2**2)
    s2 = noise.sigma**2
    tau = 10 * sum(math.exp(-2 * math.pi**2 * s2 * k / (k + 1)) for k in range(1, sites))
    eps = min(
        math.sqrt(delta_2**2 / (sites * s2) + tau * delta_1 / 2),
        delta_2 / (math.sqrt(sites) * noise.sigma) + tau * delta_1,
    )
    return eps**2 / 2


def epsilon(rhos: list[float], delta: float) -> float:
    """The run's epsilon at `delta` after rounds with these rho values."""
    return zcdp_epsilon(sum(rhos), delta)


def noise_for(*, target_epsilon: float, delta: float, rounds: int) -> float:
    """The noise multiplier (sum's std over Delta_2) that keeps `rounds` rounds within
    `target_epsilon`, ignoring tau (negligible at these noise levels; the accountant keeps it)."""
    lo, hi = 1e-3, 1e6
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if zcdp_epsilon(rounds / (2 * mid**2), delta) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
