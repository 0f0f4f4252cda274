"""The [privacy] table of an experiment: the DP mode, the accountant, the neighbours an
epsilon is for, and their checks (re-exported by `fedcore.config`)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass


class PrivacyMode(enum.StrEnum):
    NONE = "none"
    SAMPLE = "sample"  # DP-SGD at each site (one example = one unit of privacy)
    USER_CENTRAL = "user-central"  # DP-FedAvg: sites clip, the server adds the noise
    USER_DISTRIBUTED = "user-distributed"  # sites clip and add integer noise before masking


class Accountant(enum.StrEnum):
    PLD = "pld"  # privacy loss distributions (Google's dp-accounting): the tightest we have
    RDP = "rdp"  # Renyi DP (Opacus's): looser; what fedcore used before PLD


class Unit(enum.StrEnum):
    """What an epsilon protects: one training example, or one site's whole data."""

    EXAMPLE = "example"
    SITE = "site"


class Adjacency(enum.StrEnum):
    """Which neighbouring datasets an epsilon is about."""

    ADD_REMOVE = "add-remove"  # one unit (an example, a site) more or less
    REPLACE_ONE = "replace-one"  # one unit swapped for another: the size is public
    ZERO_OUT = "zero-out"  # a site present with its contribution zeroed (the count of sites is public)


@dataclass(frozen=True)
class PrivacyConfig:
    mode: PrivacyMode = PrivacyMode.NONE
    noise_multiplier: float | None = None  # give this or target_epsilon
    target_epsilon: float | None = None  # the noise is chosen so the whole run stays within it
    delta: float = 1e-5
    accountant: Accountant = Accountant.PLD  # for planning the noise and for every epsilon reported
    # Which neighbours the run is planned and reported for; None: the mode's own (add-remove for
    # sample and user-central, zero-out for user-distributed, the only one its sum allows).
    adjacency: Adjacency | None = None
    max_grad_norm: float = 1.0  # sample: each example's gradient is clipped to this L2 norm
    # sample: each DP-SGD step's batch takes every example with this probability, and a round
    # runs `local_steps` steps. Both are public and the same at every site, so a site's
    # privacy cost (and the epsilon it reports) says nothing of how many examples it holds.
    sample_rate: float = 1.0
    local_steps: int = 1
    # sample: the public number each step's noisy sum of clipped gradients is divided by (about
    # sample_rate x a typical site's count), never the site's own count: that would make the
    # update depend on the count outside what the accountant covers
    expected_batch: float = 100.0
    ghost_clipping: bool = False  # sample: Opacus's ghost clipping (no per-example gradients kept)
    clip_norm: float = 1.0  # user-level: each site's update is clipped to this L2 norm (initial, if adaptive)
    adaptive_clipping: bool = False  # user-central: Andrew et al. 2021's quantile-tracking clip norm
    target_quantile: float = 0.5  # adaptive: the fraction of updates left unclipped
    clip_learning_rate: float = 0.2  # adaptive: geometric step of the clip norm
    clipped_count_stddev: float | None = None  # adaptive: noise on the unclipped count (None: sites/20)
    secure_rng: bool = True  # False: reproducible noise for tests, and NO privacy
    # sample: the Gaussian noise (x the per-record sensitivity) each site adds to the
    # statistics a task asks for before round 1 (tabular's standardisation)
    statistics_noise_multiplier: float = 10.0

    @property
    def enabled(self) -> bool:
        return self.mode is not PrivacyMode.NONE

    @property
    def neighbours(self) -> Adjacency:
        """The neighbouring relation the run's epsilon is for (`adjacency` or the mode's own)."""
        if self.adjacency is not None:
            return self.adjacency
        return Adjacency.ZERO_OUT if self.mode is PrivacyMode.USER_DISTRIBUTED else Adjacency.ADD_REMOVE

    @property
    def user_level(self) -> bool:
        return self.mode in (PrivacyMode.USER_CENTRAL, PrivacyMode.USER_DISTRIBUTED)


def validate_privacy(
    p: PrivacyConfig, need: Callable[[bool, str], None], *, secure: bool, bits: int | None
) -> None:
    """`need(ok, message)` for each rule of [privacy] (`secure`, `bits`: [secure_aggregation]'s)."""
    if not p.enabled:
        return
    mode = f"[privacy] mode = {p.mode.value!r}"
    need(
        (p.noise_multiplier is None) != (p.target_epsilon is None),
        f"{mode} needs exactly one of noise_multiplier and target_epsilon",
    )
    need(p.noise_multiplier is None or p.noise_multiplier > 0, "[privacy] noise_multiplier must be > 0")
    need(p.target_epsilon is None or p.target_epsilon > 0, "[privacy] target_epsilon must be > 0")
    need(0 < p.delta < 1, f"[privacy] delta must be in (0, 1), got {p.delta}")
    need(p.statistics_noise_multiplier > 0, "[privacy] statistics_noise_multiplier must be > 0")
    need(p.max_grad_norm > 0 and p.clip_norm > 0, "[privacy] max_grad_norm and clip_norm must be > 0")
    need(0 < p.target_quantile < 1, "[privacy] target_quantile must be in (0, 1)")
    need(0 < p.sample_rate <= 1, f"[privacy] sample_rate must be in (0, 1], got {p.sample_rate}")
    need(p.local_steps >= 1, f"[privacy] local_steps must be >= 1, got {p.local_steps}")
    need(p.expected_batch > 0, f"[privacy] expected_batch must be > 0, got {p.expected_batch}")
    distributed = p.mode is PrivacyMode.USER_DISTRIBUTED
    need(
        p.adjacency is None or (p.adjacency is Adjacency.ZERO_OUT) == distributed,
        "[privacy] adjacency: user-distributed DP holds for zero-out neighbours only (its sum counts the "
        "sites), and zero-out is meaningful for it alone",
    )
    need(p.clip_learning_rate > 0, "[privacy] clip_learning_rate must be > 0")
    need(
        p.clipped_count_stddev is None or p.clipped_count_stddev > 0,
        "[privacy] clipped_count_stddev must be > 0",
    )
    need(
        not p.ghost_clipping or p.mode is PrivacyMode.SAMPLE,
        "[privacy] ghost_clipping is a DP-SGD option: it needs mode = 'sample'",
    )
    need(
        not (p.adaptive_clipping and p.clipped_count_stddev and p.noise_multiplier)
        or 2 * p.clipped_count_stddev > p.noise_multiplier,
        "[privacy] clipped_count_stddev must exceed noise_multiplier / 2 (the update keeps a share of the noise)",
    )
    need(
        not p.adaptive_clipping or p.mode is PrivacyMode.USER_CENTRAL,
        "[privacy] adaptive_clipping needs mode = 'user-central' (distributed noise would need the "
        "unclipped count under secure aggregation too)",
    )
    need(
        not (p.adaptive_clipping and secure),
        "[privacy] adaptive_clipping with secure aggregation is not supported: the server would "
        "need each site's unclipped bit; use a fixed clip_norm",
    )
    need(
        p.mode is not PrivacyMode.USER_DISTRIBUTED or secure,
        "[privacy] mode = 'user-distributed' adds noise meant to be hidden under secure aggregation: "
        "set [secure_aggregation] enabled = true (or use 'user-central')",
    )
    need(
        bits is None or bits in (32, 64) or (p.mode is PrivacyMode.USER_DISTRIBUTED and 16 <= bits < 32),
        f"[secure_aggregation] bits must be 32 or 64 (16 to 31 only for user-distributed DP, whose "
        f"sites rotate their updates first), got {bits}",
    )
