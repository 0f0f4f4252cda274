"""A pipeline: wrappers around one leaf, driven by the engine once per attempt at a round.

The engine asks it how to sample, whether the round may start, and for the aggregate; it
never looks inside a stage. Site plans are collected outermost first; aggregates are
finished innermost first, as TensorFlow Federated nests its aggregation factories.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fedcore.aggregation.base import (
    Aggregate,
    Exchange,
    Leaf,
    RoundContext,
    RoundInfo,
    SiteReply,
    Stage,
)
from fedcore.aggregation.plans import StagePlan
from fedcore.errors import ConfigError

log = logging.getLogger(__name__)


class Pipeline:
    def __init__(self, wrappers: Sequence[Stage], leaf: Leaf) -> None:
        self.wrappers = list(wrappers)
        self.leaf = leaf
        self.stages: list[Stage] = [*self.wrappers, leaf]
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"a stage appears twice in the pipeline: {names}")
        self.completes_any_sample = any(s.completes_any_sample for s in self.stages)
        self.withholds_evaluation = next(
            (s.withholds_evaluation for s in self.stages if s.withholds_evaluation), None
        )
        self.reserved_metrics = frozenset().union(*(s.reserved_metrics for s in self.stages))
        self.accounts_privacy = any(s.accounts_privacy for s in self.stages)

    def __str__(self) -> str:
        return " <- ".join(s.name for s in self.stages)

    def plan(self, info: RoundInfo) -> tuple[StagePlan, ...]:
        return tuple(item for s in self.stages if (item := s.site_plan(info)) is not None)

    def sample(self, available: Sequence[str], info: RoundInfo) -> list[str] | None:
        for stage in self.stages:
            if (chosen := stage.sample(available, info)) is not None:
                return chosen
        return None

    def check_round(self, info: RoundInfo) -> None:
        for stage in self.stages:
            stage.check_round(info)

    async def aggregate(self, info: RoundInfo, exchange: Exchange) -> Aggregate | None:
        """Run the leaf's exchanges and finish the aggregate; None when the attempt failed
        with no one to blame, an aggregate whose `rejected` says why when it failed with
        culprits in `dropped`. Every aggregate the server obtains is accounted, whether the
        engine keeps it or not."""

        def admit(reply: SiteReply) -> SiteReply:
            for stage in self.wrappers:
                reply = stage.admit(reply, info)
            return reply

        def before_release(contributors: int) -> None:
            for stage in self.wrappers:
                stage.before_release(contributors, info)

        context = RoundContext(info, exchange, self.plan, admit, before_release, self.completes_any_sample)
        aggregate = await self.leaf.collect(context)
        if aggregate is None or (aggregate.rejected and aggregate.sum is None and aggregate.integers is None):
            return aggregate  # nothing was released: nothing to finish or account
        for stage in reversed(self.wrappers):
            aggregate = stage.finish(aggregate, info)
        for stage in self.stages:
            stage.account(aggregate, info)
        if aggregate.rejected is not None:
            log.warning(
                "round %d attempt %d: result rejected: %s", info.round, info.attempt, aggregate.rejected
            )
        return aggregate

    def statistics_released(self) -> None:
        """A statistics sum was released before round 1 (once per attempt that obtained one)."""
        for stage in self.stages:
            stage.statistics_released()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for stage in self.stages:
            out.update(stage.summary())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {s.name: s.state_dict() for s in self.stages}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != {s.name for s in self.stages}:
            raise ConfigError(f"saved stages {sorted(state)} are not this pipeline's ({self})")
        for stage in self.stages:
            stage.load_state_dict(state[stage.name])
