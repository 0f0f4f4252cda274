"""The stages of the statistics exchange: before round 1, sites send a task's statistics
vector (e.g. tabular's per-column counts, sums and sums of squares) and the server learns
its sum, through the same leaves as a round's updates (weighted mean with weight 1, or the
secure sum). Under sample-level DP each site adds Gaussian noise scaled to the task's
per-record sensitivity and charges its ledger; under secure aggregation each site divides
its vector by a public cap on its records, so that the entries fit the fixed point.

    no DP, no SecAgg     statistics_check <- mean
    SecAgg               statistics_scale <- quantize (equal weights, 64 bits) <- secure_sum
    sample-level DP      statistics_noise <- (either of the above)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedcore.aggregation.base import Aggregate, Leaf, RoundInfo, Section, SiteReply, Stage
from fedcore.aggregation.mean import WeightedMean
from fedcore.aggregation.pipeline import Pipeline
from fedcore.aggregation.plans import StagePlan, StatisticsNoisePlan, StatisticsScalePlan
from fedcore.aggregation.private import EPSILON
from fedcore.aggregation.quantize import Quantize
from fedcore.aggregation.secure_sum import SecureSum
from fedcore.config import Experiment, PrivacyMode
from fedcore.errors import ConfigError, ProtocolError
from fedcore.tasks import Task, max_examples_per_site

BITS = 64  # a sum of counts up to `max_examples` per site, to about 1e-12 of one record


class StatisticsNoise(Stage):
    name = "statistics_noise"
    section = Section.PRIVACY

    def __init__(
        self,
        *,
        noise_multiplier: float,
        delta: float,
        secure_rng: bool,
        on_release: Callable[[], None] = lambda: None,
    ) -> None:
        """`on_release`: told of every statistics sum the server obtains (each one the sites
        paid for, kept or not): the run's privacy stage accounts them."""
        self.noise_multiplier, self.delta, self.secure_rng = noise_multiplier, delta, secure_rng
        self.on_release = on_release

    def site_plan(self, info: RoundInfo) -> StagePlan:
        return StatisticsNoisePlan(self.noise_multiplier, self.delta, info.run_id, self.secure_rng)

    def account(self, aggregate: Aggregate, info: RoundInfo) -> None:
        reported = {s: float(m[EPSILON]) for s, m in aggregate.site_metrics.items() if EPSILON in m}
        aggregate.measure(self.section, noise_multiplier=self.noise_multiplier, site_epsilon=reported)
        self.on_release()


class StatisticsCheck(Stage):
    """A plain statistics reply is one site's vector as it is: weight 1 (a sum, not a mean)
    and values a sum of records can take, so that no site can overflow the sum for all."""

    name = "statistics_check"
    LIMIT = 1e100

    def admit(self, reply: SiteReply, info: RoundInfo) -> SiteReply:
        values = next(iter((reply.update or {}).values()), np.zeros(0))
        if reply.weight != 1 or not (np.abs(values) <= self.LIMIT).all():
            raise ProtocolError("a statistics reply needs weight 1 and values within 1e100")
        return reply


class StatisticsScale(Stage):
    name = "statistics_scale"
    section = Section.SECURE_AGGREGATION

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def site_plan(self, info: RoundInfo) -> StagePlan:
        return StatisticsScalePlan(self.scale)

    def finish(self, aggregate: Aggregate, info: RoundInfo) -> Aggregate:
        if aggregate.sum is not None:
            aggregate.sum = {k: v * self.scale for k, v in aggregate.sum.items()}
        return aggregate


def statistics_pipeline_for(
    experiment: Experiment, task: Task, run: Pipeline | None = None
) -> Pipeline | None:
    """The statistics exchange's pipeline for `task`, or None when it needs no statistics.
    `run`: the run's pipeline, whose privacy stage accounts every statistics release."""
    if task.statistics_size() < 1:
        return None
    bounded = task.statistics_sensitivity() is not None
    return build_statistics_pipeline(
        experiment,
        bounded=bounded,
        on_release=run.statistics_released if run else None,
        max_examples=max_examples_per_site(experiment, task),
    )


def build_statistics_pipeline(
    experiment: Experiment,
    *,
    bounded: bool,
    on_release: Callable[[], None] | None = None,
    max_examples: int = Task.max_examples_per_site,
) -> Pipeline:
    """The statistics exchange's pipeline. `bounded`: one record's contribution has a finite
    sensitivity (the task's public ranges), which DP noise and the secure sum's fixed point need."""
    p, sa = experiment.privacy, experiment.secure_aggregation
    wrappers: list[Stage] = []
    if p.user_level:
        raise ConfigError(
            f"the task's federated statistics have no {p.mode.value} DP release; "
            "use [task] standardise = 'ranges' (with [task] ranges), or sample-level DP"
        )
    if (p.mode is PrivacyMode.SAMPLE or sa.enabled) and not bounded:
        raise ConfigError(
            "federated statistics under DP or secure aggregation need public bounds for every "
            "numeric column: [task] ranges = {COLUMN = [LOW, HIGH], ...}"
        )
    if p.mode is PrivacyMode.SAMPLE:
        wrappers.append(
            StatisticsNoise(
                noise_multiplier=p.statistics_noise_multiplier,
                delta=p.delta,
                secure_rng=p.secure_rng,
                on_release=on_release or (lambda: None),
            )
        )
    leaf: Leaf
    if sa.enabled:
        wrappers += [
            StatisticsScale(float(max_examples)),
            Quantize(clip_range=1.0, bits=BITS, max_examples=1, equal_weights=True),
        ]
        leaf = SecureSum(sa, bits=BITS)
    else:
        wrappers.append(StatisticsCheck())
        leaf = WeightedMean()
    return Pipeline(wrappers, leaf)
