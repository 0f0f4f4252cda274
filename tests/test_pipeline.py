"""The stage pipeline at the engine's boundary (a scripted Exchange): what the builder
composes for each mode, what each stage's server part does to the sites' inputs, and that
every stage's state continues from its state_dict."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from fedcore import load_experiment
from fedcore.aggregation import (
    Aggregate,
    Drop,
    Pipeline,
    RoundInfo,
    SiteReply,
    SiteRequest,
    build_pipeline,
)
from fedcore.aggregation.plans import CentralNoisePlan, ClipPlan, QuantizePlan, SampleDPPlan
from fedcore.config import Experiment
from fedcore.errors import ConfigError
from tests.test_dp_mechanisms import variance_within

MODEL = {"w": np.zeros(3, np.float32)}


def info(sampled: Sequence[str], model: dict[str, np.ndarray] = MODEL, round_number: int = 1) -> RoundInfo:
    return RoundInfo("run", round_number, 1, tuple(sampled), len(sampled), model, seed=0)


def scripted(replies: dict[str, SiteReply]) -> Callable[..., object]:
    """An Exchange where each site answers the fit with its scripted reply."""

    async def exchange(
        name: str,
        sites: Sequence[str],
        request: Callable[[str], SiteRequest],
        accept: Callable[[SiteReply], None],
    ) -> dict[str, Drop]:
        for site in sites:
            assert request(site).train
            accept(replies[site])
        return {}

    return exchange


def aggregate(
    pipeline: Pipeline, replies: dict[str, SiteReply], model: dict[str, np.ndarray] = MODEL
) -> Aggregate:
    round_info = info(list(replies), model)
    sampled = pipeline.sample(list(replies), round_info) or list(replies)
    result = asyncio.run(pipeline.aggregate(info(sampled, model), scripted(replies)))  # type: ignore[arg-type]
    assert result is not None
    return result


def experiment(**overrides: object) -> Experiment:
    return load_experiment().override(**overrides)


@pytest.mark.parametrize(
    ("overrides", "stages", "plan"),
    [
        ({}, "mean", []),
        ({"aggregation__rule": "median"}, "robust", []),
        ({"aggregation__clip_norm": 2.0}, "clip <- mean", [ClipPlan]),
        ({"privacy__mode": "sample", "privacy__noise_multiplier": 1.0}, "sample_dp <- mean", [SampleDPPlan]),
        (
            {"privacy__mode": "user-central", "privacy__noise_multiplier": 1.0},
            "central_noise <- clip <- mean",
            [CentralNoisePlan, ClipPlan],
        ),
        ({"secure_aggregation__enabled": True}, "quantize <- secure_sum", [QuantizePlan]),
        (
            {
                "secure_aggregation__enabled": True,
                "privacy__mode": "user-central",
                "privacy__noise_multiplier": 1.0,
            },
            "central_noise <- clip <- quantize <- secure_sum",
            [CentralNoisePlan, ClipPlan, QuantizePlan],
        ),
    ],
)
def test_each_mode_is_a_composition_of_stages(
    overrides: dict[str, object], stages: str, plan: list[type]
) -> None:
    pipeline = build_pipeline(experiment(**overrides))
    assert str(pipeline) == stages
    assert [type(item) for item in pipeline.plan(info(["a", "b"]))] == plan


def test_secure_aggregation_withholds_federated_evaluation() -> None:
    """Per-site metrics and the counts that weigh them are more than the sum."""
    assert build_pipeline(experiment()).withholds_evaluation is None
    assert (
        build_pipeline(experiment(secure_aggregation__enabled=True)).withholds_evaluation
        == "secure aggregation"
    )


def test_a_robust_rule_under_secure_aggregation_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs every site's update"):
        experiment(aggregation__rule="krum", secure_aggregation__enabled=True)


def test_the_server_reclips_what_a_site_sends() -> None:
    pipeline = build_pipeline(
        experiment(privacy__mode="user-central", privacy__noise_multiplier=1e-12, privacy__clip_norm=2.0)
    )
    result = aggregate(
        pipeline,
        {
            "a": SiteReply("a", {"w": np.array([1e6, 0, 0], np.float32)}, weight=5.0),  # a dishonest site
            "b": SiteReply("b", {"w": np.array([0, 1.0, 0], np.float32)}, weight=1.0),
        },
    )
    # (2 + 0, 0 + 1) / 2 expected sites, to the release grid (clip / (2^16 sqrt(3)) per step)
    assert result.mean["w"] == pytest.approx([1.0, 0.5, 0.0], abs=2e-5)


def test_central_noise_has_the_configured_std() -> None:
    pipeline = build_pipeline(
        experiment(privacy__mode="user-central", privacy__noise_multiplier=2.0, privacy__clip_norm=1.5)
    )
    model = {"w": np.zeros(100_000, np.float32)}
    replies = {s: SiteReply(s, {"w": np.zeros(100_000, np.float32)}, 1.0) for s in "abcd"}
    result = aggregate(pipeline, replies, model)
    variance_within(result.mean["w"] * 4.0, 9.0)  # std z x C = 3 on the sum of 4 expected sites
    assert result.measurements["privacy"]["noise_multiplier"] == 2.0


def test_weighted_mean_and_its_state_free_leaf() -> None:
    pipeline = build_pipeline(experiment())
    result = aggregate(
        pipeline,
        {
            "a": SiteReply("a", {"w": np.ones(3, np.float32)}, 1.0),
            "b": SiteReply("b", {"w": np.full(3, 4.0, np.float32)}, 3.0),
        },
    )
    np.testing.assert_allclose(result.mean["w"], (1 + 12) / 4)
    assert result.contributors == ["a", "b"] and result.count == 2


def test_stage_state_is_a_value_that_continues_the_run() -> None:
    """Accounting after a state round trip through JSON equals accounting without one."""
    e = experiment(
        privacy__mode="user-central",
        privacy__noise_multiplier=1.1,
        privacy__adaptive_clipping=True,
        privacy__secure_rng=False,
    )
    replies = {s: SiteReply(s, {"w": np.ones(3, np.float32)}, 1.0, {"unclipped": 1.0}) for s in "abcdef"}

    def rounds(pipeline: Pipeline, numbers: range) -> list[Aggregate]:
        out = []
        for n in numbers:
            i = info(list(replies), round_number=n)
            sampled = pipeline.sample(list(replies), i) or list(replies)
            result = asyncio.run(pipeline.aggregate(info(sampled, round_number=n), scripted(replies)))  # type: ignore[arg-type]
            assert result is not None
            out.append(result)
        return out

    straight = build_pipeline(e)
    expected = rounds(straight, range(1, 5))
    first = build_pipeline(e)
    rounds(first, range(1, 3))
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = build_pipeline(e)
    resumed.load_state_dict(saved)
    again = rounds(resumed, range(3, 5))
    assert [r.measurements for r in again] == [r.measurements for r in expected[2:]]
    for ours, theirs in zip(again, expected[2:], strict=True):
        np.testing.assert_array_equal(ours.mean["w"], theirs.mean["w"])
