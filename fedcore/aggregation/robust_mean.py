"""The robust leaf: a Byzantine-robust rule over the sites' individual updates (median,
trimmed mean, Krum, multi-Krum; see `robust.py`). It needs every update in the clear, so the
builder never pairs it with secure aggregation. Rules are unweighted: a site's claimed
example count is exactly what an attacker would inflate."""

from __future__ import annotations

import logging

import numpy as np

from fedcore.aggregation import robust
from fedcore.aggregation.base import Aggregate, Leaf, RoundContext, SiteReply, SiteRequest
from fedcore.aggregation.mean import checked
from fedcore.config import AggregationRule
from fedcore.tensors import flatten, unflatten

log = logging.getLogger(__name__)


class RobustMean(Leaf):
    name = "robust"
    needs_individual_updates = True

    def __init__(self, rule: AggregationRule, *, trim: float, byzantine: int) -> None:
        self.rule = rule
        self.trim = trim
        self.byzantine = byzantine

    async def collect(self, context: RoundContext) -> Aggregate | None:
        info = context.info
        rows: list[np.ndarray] = []
        sites: list[str] = []
        metrics: dict[str, dict[str, float]] = {}

        def accept(reply: SiteReply) -> None:
            checked(reply, info.model)
            reply = context.admit(reply)
            assert reply.update is not None
            rows.append(flatten(reply.update, info.model))
            sites.append(reply.site)
            metrics[reply.site] = dict(reply.metrics)

        plan = context.plan(info)
        dropped = await context.exchange(
            "fit", info.sampled, lambda s: SiteRequest(train=True, plan=plan), accept
        )
        if not rows:
            return Aggregate(sum=None, weight=0.0, count=0, contributors=[], dropped=dropped)
        order = sorted(range(len(sites)), key=sites.__getitem__)  # ties (Krum) broken by name, not timing
        rows, sites = [rows[i] for i in order], [sites[i] for i in order]
        try:
            result = robust.aggregate(
                self.rule.value, np.stack(rows), trim=self.trim, byzantine=self.byzantine
            )
        except ValueError as err:  # e.g. Krum needs n >= 2f + 3 updates
            log.warning(
                "round %d: %s with %d updates: %s; retrying", info.round, self.rule.value, len(rows), err
            )
            return None
        aggregate = Aggregate(
            sum=unflatten(result.update, info.model),
            weight=1.0,
            count=len(rows),
            contributors=sites,
            dropped=dropped,
            site_metrics=metrics,
        )
        aggregate.measure(
            self.section,
            rule=self.rule.value,
            selected=[sites[i] for i in result.selected],
            trimmed=sorted(sites[i] for i in result.trimmed),
        )
        return aggregate
