"""The one place that reads the experiment's aggregation, privacy and secure-aggregation
settings and turns them into a pipeline of stages. A new stage is a module and a line here.

    no DP, no SecAgg            mean | robust rule          (optionally <- clip)
    sample-level DP             sample_dp <- mean | robust rule
    user-central DP             central_noise <- clip (equal weights) <- mean
    SecAgg                      quantize <- secure_sum
    user-central DP + SecAgg    central_noise <- clip (equal weights) <- quantize (equal weights) <- secure_sum
    user-distributed DP         distributed_noise <- secure_sum (20 bits, rotated)
"""

from __future__ import annotations

from collections.abc import Callable

from fedcore.aggregation.base import Leaf, Stage
from fedcore.aggregation.central_noise import CentralNoise
from fedcore.aggregation.clip import Clip
from fedcore.aggregation.distributed_noise import DistributedNoise
from fedcore.aggregation.mean import WeightedMean
from fedcore.aggregation.pipeline import Pipeline
from fedcore.aggregation.quantize import Quantize
from fedcore.aggregation.robust_mean import RobustMean
from fedcore.aggregation.sample_dp import SampleLevelDP
from fedcore.aggregation.secure_sum import SecureSum
from fedcore.config import AggregationRule, Experiment, PrivacyMode
from fedcore.errors import ConfigError
from fedcore.tasks import Task, max_examples_per_site


def pipeline_for(experiment: Experiment, task: Task) -> Pipeline:
    """The experiment's pipeline for rounds of `task`."""
    return build_pipeline(
        experiment,
        supports_dp_sgd=task.supports_dp_sgd,
        releases_statistics=task.statistics_size() > 0,
        max_examples=max_examples_per_site(experiment, task),
    )


def build_pipeline(
    experiment: Experiment,
    *,
    supports_dp_sgd: bool = True,
    releases_statistics: bool = False,
    max_examples: int = Task.max_examples_per_site,
) -> Pipeline:
    """`releases_statistics`: the task's statistics go out before round 1 (under sample-level
    DP, a target epsilon must cover them too); `max_examples`: the public bound on a site's
    example count (`max_examples_per_site`)."""
    p, sa, agg, fed = (
        experiment.privacy,
        experiment.secure_aggregation,
        experiment.aggregation,
        experiment.federation,
    )
    common = {"rounds": fed.rounds, "seed": experiment.seed}
    wrappers: list[Stage] = []
    vector_length: Callable[[int], int] | None = None  # a site's encoding's integers, if not d + 1
    if p.mode is PrivacyMode.SAMPLE:
        if not supports_dp_sgd:
            raise ConfigError(
                f"task {experiment.task.name!r} cannot train with DP-SGD ([privacy] mode = 'sample')"
            )
        wrappers.append(SampleLevelDP(p, releases_statistics=releases_statistics, **common))
    elif p.mode is PrivacyMode.USER_CENTRAL:
        clip = Clip(p.clip_norm, equal_weights=True, report_unclipped=p.adaptive_clipping)
        wrappers += [CentralNoise(p, clip=clip, sites_per_round=fed.sites_per_round, **common), clip]
    elif p.mode is PrivacyMode.USER_DISTRIBUTED:
        distributed = DistributedNoise(  # it clips, scales and rounds itself, and samples
            p,
            bits=experiment.secagg_bits,
            sites_per_round=fed.sites_per_round,
            min_sites=fed.min_sites,
            **common,
        )
        wrappers.append(distributed)
        vector_length = distributed.vector_length
    if agg.clip_norm is not None and p.mode is not PrivacyMode.USER_CENTRAL:
        wrappers.append(Clip(agg.clip_norm))
    leaf: Leaf
    if sa.enabled:
        if p.mode is not PrivacyMode.USER_DISTRIBUTED:
            wrappers.append(
                Quantize(
                    clip_range=sa.clip_range,
                    bits=experiment.secagg_bits,
                    max_examples=max_examples,
                    equal_weights=p.enabled,  # under DP no count leaves a site, masked or not
                )
            )
        leaf = SecureSum(
            sa,
            bits=experiment.secagg_bits,
            length=vector_length,
        )
    elif agg.rule is AggregationRule.MEAN:
        leaf = WeightedMean()
    else:
        leaf = RobustMean(agg.rule, trim=agg.trim, byzantine=agg.byzantine)
    return Pipeline(wrappers, leaf)
