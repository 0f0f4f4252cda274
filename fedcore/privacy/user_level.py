"""User-level DP (one site's whole contribution is the unit of privacy): DP-FedAvg
(McMahan et al., ICLR 2018) with optional adaptive clipping (Andrew et al., NeurIPS 2021).

Sites clip their update to L2 norm C and weigh equally. The server sums the clipped updates,
adds Gaussian noise of std z x C and divides by the expected number of sites (a fixed
denominator: the actual count would depend on who took part). Sites are Poisson-sampled
with rate q, so one round is the subsampled Gaussian mechanism `Mechanism(z, q, 1)` for the
RDP accountant.

Adaptive clipping: each site also reports whether its update was within C; the server sums
those bits with Gaussian noise sigma_b, and moves C geometrically towards the target quantile:
C <- C exp(-eta (noisy fraction unclipped - target)). The two noisy sums together are one
Gaussian mechanism of multiplier z when the update noise uses
z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2) (Andrew et al., Theorem 1).
"""

from __future__ import annotations

import math

import numpy as np

from fedcore.errors import ConfigError
from fedcore.privacy.randomness import SecureRandom


def update_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """The update's share of noise when the unclipped count takes its share (Andrew et al.)."""
    rest = noise_multiplier**-2 - (2 * clipped_count_stddev) ** -2
    if rest <= 0:
        raise ConfigError(
            f"[privacy] clipped_count_stddev {clipped_count_stddev} is too small for noise_multiplier "
            f"{noise_multiplier}: it must exceed noise_multiplier / 2"
        )
    return float(rest**-0.5)


class AdaptiveClip:
    """Andrew et al.'s geometric update of the clip norm from the noisy unclipped fraction."""

    def __init__(
        self, *, initial: float, target_quantile: float, learning_rate: float, count_stddev: float | None
    ) -> None:
        self.clip_norm = initial
        self.target_quantile = target_quantile
        self.learning_rate = learning_rate
        self.count_stddev = count_stddev

    def update(self, unclipped: int, contributors: int, expected_sites: float, random: SecureRandom) -> float:
        """Move the clip norm from the noisy fraction of unclipped updates. The bits are
        centred (b - 1/2, sensitivity 1/2, as the noise split assumes) and the expected count
        is added back, so the actual count is never used in the clear. The noise is a discrete
        Gaussian on the doubled (integer) centred count: no floating-point noise is released."""
        assert self.count_stddev is not None, "set when the round's noise is known"
        doubled = 2 * unclipped - contributors + int(random.discrete_gaussian(1, 2 * self.count_stddev)[0])
        centred = doubled / 2
        fraction = centred / expected_sites + 0.5
        self.clip_norm *= math.exp(-self.learning_rate * (fraction - self.target_quantile))
        return fraction


GRID_RESOLUTION = 1 << 16  # grid steps per unit of clip norm and sqrt(dimension)


def grid_noised(
    total: np.ndarray, *, noise_multiplier: float, clip: float, random: SecureRandom
) -> tuple[np.ndarray, float]:
    """The central release without floating-point noise: the sum of clipped updates on an
    integer grid of step g = clip / (GRID_RESOLUTION sqrt(d)), rounded, plus discrete Gaussian
    integers, times g. Rounding moves a neighbour's sum by at most clip / g + sqrt(d) grid
    steps (clip / g from the update, less than one step per coordinate from the rounding), so
    sigma = noise_multiplier x (clip / g + sqrt(d)) keeps the accounted multiplier exactly
    `noise_multiplier`. It is accounted as the continuous Gaussian at that ratio: the discrete
    Gaussian has the same zCDP (rho = Delta^2 / 2 sigma^2, Canonne, Kamath and Steinke 2020),
    but its delta(epsilon) can exceed the continuous one's, by an amount that vanishes with
    sigma (an independent review computed 9e-6 at sigma 50; here sigma is at least 65,537 z
    grid steps). Every released value is g times an integer: no low-order bits of a float
    draw leave. Returns it and g."""
    d = max(total.size, 1)
    step = clip / (GRID_RESOLUTION * math.sqrt(d))
    sensitivity = clip / step + math.sqrt(d)
    integers = np.rint(np.asarray(total, dtype=np.float64) / step).astype(np.int64)
    integers += random.discrete_gaussian(total.size, noise_multiplier * sensitivity)
    return integers.astype(np.float64) * step, step
