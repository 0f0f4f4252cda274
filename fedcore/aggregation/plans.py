"""The stage plan: what each aggregation stage asks of a site in a round, as typed values
(never string keys). A fit instruction carries the pipeline's plan, outermost stage first;
the site applies each item (see `site.py`) and refuses a plan its own policy forbids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class PlanItem:
    # The item protects the site's data with differential privacy: no exact statistic of
    # that data (training loss, example count, evaluation metrics) leaves the site.
    private: ClassVar[bool] = False


@dataclass(frozen=True)
class ClipPlan(PlanItem):
    norm: float  # clip the update, as one vector, to this L2 norm
    equal_weights: bool = False  # every site weighs 1 (user-level DP)
    report_unclipped: bool = False  # say whether the update was within the norm (adaptive clipping)


@dataclass(frozen=True)
class SampleDPPlan(PlanItem):
    """DP-SGD at the site: one training example is the unit of privacy."""

    private: ClassVar[bool] = True
    max_grad_norm: float
    rounds: int
    delta: float
    run: str
    sample_rate: float = 1.0  # each step's Poisson sampling rate: public, the same at every site
    local_steps: int = 1  # DP-SGD steps per round: public too
    noise_multiplier: float | None = None  # exactly one of these two
    target_epsilon: float | None = None  # over `rounds` rounds, by the site's own accounting
    accountant: str = "pld"  # what the target is planned and checked with (an `Accountant`)
    adjacency: str = "add-remove"  # the neighbours the target is for (an `Adjacency`)
    expected_batch: float = 100.0  # the public denominator of each step's noisy gradient sum
    ghost_clipping: bool = False
    secure_rng: bool = True
    # The run also releases the task's statistics with this noise multiplier (one Gaussian
    # release, before round 1): a target epsilon covers it and the DP-SGD rounds together.
    statistics_noise: float | None = None


@dataclass(frozen=True)
class CentralNoisePlan(PlanItem):
    """User-level DP whose noise the server adds (DP-FedAvg): the site only clips."""

    private: ClassVar[bool] = True
    delta: float
    run: str


@dataclass(frozen=True)
class DistributedNoisePlan(PlanItem):
    """Clip, scale, round and add discrete Gaussian noise before masking (Kairouz et al.)."""

    private: ClassVar[bool] = True
    clip_norm: float
    scale: float
    sigma: float
    delta: float
    run: str
    secure_rng: bool = True
    bits: int = 64  # the secure sum's modulus: below 64, rotate (public seed) and let the integers wrap
    rotation: int = 0


@dataclass(frozen=True)
class QuantizePlan(PlanItem):
    """Fixed point for the secure sum: [clip(update) x w, w], w in (0, 1]."""

    clip_range: float
    step: float
    max_examples: int  # w = min(examples, max_examples) / max_examples
    bits: int
    equal_weights: bool = False  # w = 1


@dataclass(frozen=True)
class StatisticsNoisePlan(PlanItem):
    """Gaussian noise on a task's statistics vector (before round 1): std = noise_multiplier x
    the task's per-record sensitivity, charged to the site's ledger as one Gaussian release."""

    private: ClassVar[bool] = True
    noise_multiplier: float
    delta: float
    run: str
    secure_rng: bool = True


@dataclass(frozen=True)
class StatisticsScalePlan(PlanItem):
    """Divide a task's statistics vector by `scale` (a public cap on a site's records), so
    that its entries fit the secure sum's fixed point."""

    scale: float


StagePlan = (
    ClipPlan
    | SampleDPPlan
    | CentralNoisePlan
    | DistributedNoisePlan
    | QuantizePlan
    | StatisticsNoisePlan
    | StatisticsScalePlan
)
