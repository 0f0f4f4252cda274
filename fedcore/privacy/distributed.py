"""User-level distributed DP under secure aggregation: the distributed discrete Gaussian
(Kairouz, Liu, Steinke, ICML 2021).

Each site clips its update to L2 norm `clip_norm`, scales it by `scale` into integer units,
rounds each coordinate stochastically (from the secure stream) and adds discrete Gaussian
noise N_Z(0, sigma^2) before masking. The server decrypts only the sum, which already carries
the noise of every site that sent masked input: n sites give variance n sigma^2.

Below 64 bits (the default: 20) the secure sum runs modulo 2**bits, and the site rotates
its clipped update first (`fedcore.privacy.rotation`: randomized Hadamard, public signs, d
padded to a power of two) so that every coordinate is small, then lets the noised integers
wrap (modular clipping, Kairouz et al. Sec. 4). The scale is the largest at which the sum of
the round's sites, signal, rounding and noise, wraps in no coordinate except with
probability WRAP_FAILURE; the server decodes the sum as signed `bits`-bit integers and
rotates back. Wrapping and rotating are post-processing of the integer sum: the privacy is
the same, only the rounding's share of the sensitivity (below) grows as bits shrink, and a
round refuses to start where it would pass MAX_ROUNDING_SLACK.

Sensitivity, in integer units: the clipped, scaled vector has L2 norm at most
clip_norm x scale (a rotation keeps norms), and rounding moves each of the d coordinates by
less than 1 (d: after padding), so Delta_2 = clip_norm x scale + sqrt(d) holds always (not
just with high probability); at 64 bits the scale makes the rounding slack 1% of the clip.
For integer vectors Delta_1 <= min(sqrt(d) Delta_2, Delta_2^2).

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

from fedcore.privacy import rotation
from fedcore.privacy.accountant import zcdp_epsilon
from fedcore.privacy.randomness import SecureRandom
from fedcore.tensors import clip_l2

ROUNDING_SLACK = 0.01  # sqrt(d) / (clip_norm x scale): rounding's share of the sensitivity, at most
MAX_ROUNDING_SLACK = 0.1  # beyond it a modular sum needs more bits (10% more noise for the epsilon)
MIN_SIGMA = 0.5  # each site's noise, in integer units, at least (Kairouz et al., Theorem 1)
WRAP_FAILURE = 1e-4  # the chance that a round's modular sum wraps in some coordinate, at most
PLAIN_BITS = 64  # integers that never wrap: no rotation
# The largest scaled clip or sigma a site accepts at 64 bits (floats are exact far below).
EXACT_INTEGERS = 2.0**40


def largest_integer(bits: int) -> float:
    """The largest scaled clip norm, and sigma, a site accepts for a sum modulo 2**bits: an
    honest plan stays below half the modulus (beyond it noise is uniform anyway) and far
    inside the floats' exact integers."""
    return min(EXACT_INTEGERS, math.ldexp(1.0, bits - 1))


@dataclass(frozen=True)
class DistributedNoise:
    """One round's parameters, the same for every site (sent in the fit instruction)."""

    clip_norm: float
    scale: float  # integer units per unit of the update
    sigma: float  # each site's discrete Gaussian std, in integer units
    bits: int = PLAIN_BITS  # the secure sum's modulus; below 64: rotated, wrapping
    rotation: int = 0  # the public seed of the rotation's signs (below 64 bits)

    @property
    def modular(self) -> bool:
        return self.bits < PLAIN_BITS

    def length(self, dimension: int) -> int:
        """Integers a site's encoding of a `dimension`-parameter update has, before its count."""
        return encoded_length(dimension, self.bits)

    @classmethod
    def for_model(
        cls,
        *,
        dimension: int,
        clip_norm: float,
        noise_multiplier: float,
        sites: int,
        bits: int = PLAIN_BITS,
        rotation_seed: int = 0,
    ) -> DistributedNoise:
        """Each of `sites` sites adds sigma so that the sum's std is noise_multiplier x Delta_2;
        ValueError when `bits` are too few for this model, noise and number of sites."""
        d = encoded_length(dimension, bits)
        scale = math.sqrt(d) / (ROUNDING_SLACK * clip_norm)
        if bits < PLAIN_BITS:
            scale = min(scale, modular_scale(d, clip_norm, noise_multiplier, sites, bits))
            if not math.sqrt(d) <= MAX_ROUNDING_SLACK * clip_norm * scale:
                raise ValueError(
                    f"a {bits}-bit secure sum of {sites} sites' noised updates ({dimension} parameters, "
                    f"noise multiplier {noise_multiplier:.3g}) leaves rounding more than "
                    f"{MAX_ROUNDING_SLACK:.0%} of the sensitivity: raise [secure_aggregation] bits"
                )
        delta_2 = sensitivity_l2(d, clip_norm, scale)
        sigma = noise_multiplier * delta_2 / math.sqrt(sites)
        if sites > 1 and sigma < MIN_SIGMA:
            # Kairouz et al.'s bound on the sum of discrete Gaussians assumes sigma >= 1/2.
            raise ValueError(
                f"each of {sites} sites would add a discrete Gaussian of sigma {sigma:.3g} < {MIN_SIGMA}: "
                "too fine for the accounting; use more bits, fewer sites a round or more noise"
            )
        return cls(clip_norm, scale, sigma, bits, rotation_seed)


def encoded_length(dimension: int, bits: int) -> int:
    """A `dimension`-parameter update's integers at this modulus (padded when rotated)."""
    return rotation.padded(dimension) if bits < PLAIN_BITS else dimension


def modular_scale(length: int, clip_norm: float, noise_multiplier: float, sites: int, bits: int) -> float:
    """The largest scale at which the modular sum of `sites` rotated encodings wraps nowhere
    except with probability WRAP_FAILURE: for each of the `length` coordinates,
        beta (sites x clip x scale / sqrt(length) + z (clip x scale + sqrt(length))) + sites
    below 2**(bits - 1), where beta bounds both the rotated signal's and the summed noise's
    tails (sub-Gaussian, a union bound over coordinates and the two) and each site's rounding
    moves a coordinate by less than 1. Never positive: no scale fits (ValueError)."""
    beta = rotation.flatness(length, WRAP_FAILURE / 2)
    room = math.ldexp(1.0, bits - 1) - sites - beta * noise_multiplier * math.sqrt(length)
    per_unit = beta * clip_norm * (sites / math.sqrt(length) + noise_multiplier)
    if not room > 0:
        raise ValueError(f"a {bits}-bit secure sum cannot hold {sites} sites' noise: raise its bits")
    return room / per_unit


def sensitivity_l2(dimension: int, clip_norm: float, scale: float) -> float:
    return clip_norm * scale + math.sqrt(dimension)


def encode(flat: np.ndarray, noise: DistributedNoise, random: SecureRandom) -> np.ndarray:
    """A site's integer vector: [clipped, (rotated,) scaled, stochastically rounded update +
    noise, 1]. The last entry counts the site, so the sum says how many sites' noise it
    carries. Below 64 bits the caller keeps the low bits (the sum wraps modulo 2**bits)."""
    clipped = clip_l2({"u": np.asarray(flat, dtype=np.float64)}, noise.clip_norm)[0]["u"]
    if noise.modular:
        clipped = rotation.rotate(clipped, noise.rotation)
    scaled = clipped * noise.scale
    floor = np.floor(scaled)
    rounded = floor.astype(np.int64) + (random.uniform(len(scaled)) < scaled - floor)
    noised = rounded + random.discrete_gaussian(len(scaled), noise.sigma)
    return np.concatenate([noised, [1]]).astype(np.int64)


def signed(total: np.ndarray, bits: int) -> np.ndarray:
    """A sum modulo 2**bits (any unsigned dtype) read as signed `bits`-bit integers."""
    values = np.asarray(total).astype(np.uint64).view(np.int64)
    if bits < PLAIN_BITS:
        half = 1 << (bits - 1)
        values = ((values + half) & ((1 << bits) - 1)) - half
    return values


def decode(total: np.ndarray, noise: DistributedNoise, dimension: int) -> tuple[np.ndarray, int]:
    """The (noised) sum of the sites' clipped updates, rotated back (its `dimension` values)
    and how many sites it holds."""
    values = signed(total, noise.bits)
    sums = values[:-1].astype(np.float64) / noise.scale
    if noise.modular:
        sums = rotation.unrotate(sums, noise.rotation, dimension)
    return sums, int(values[-1])


def round_rho(*, dimension: int, noise: DistributedNoise, sites: int) -> float:
    """zCDP rho of one round whose sum holds the noise of `sites` sites (Kairouz et al., Thm 1)."""
    if sites < 1:
        raise ValueError("a sum needs at least one site")
    if sites > 1 and noise.sigma < MIN_SIGMA:
        raise ValueError(f"Kairouz et al.'s bound needs sigma >= {MIN_SIGMA}, got {noise.sigma:.3g}")
    dimension = noise.length(dimension)
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
