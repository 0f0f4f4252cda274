"""L2 clipping of each site's update: the site clips, and the server clips again whatever it
receives, so a dishonest site cannot raise the sensitivity a DP stage sized its noise for.
With equal weights every site counts once (user-level DP), whatever weight it claims."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fedcore.aggregation.base import RoundInfo, SiteReply, Stage
from fedcore.aggregation.plans import ClipPlan, StagePlan
from fedcore.tensors import clip_l2

UNCLIPPED = "unclipped"  # the reply metric of a site asked to report whether it was within the norm


class Clip(Stage):
    name = "clip"
    reserved_metrics = frozenset({UNCLIPPED})

    def __init__(self, norm: float, *, equal_weights: bool = False, report_unclipped: bool = False) -> None:
        self.norm = norm  # an adaptive-clipping stage outside moves it between rounds
        self.equal_weights = equal_weights
        self.report_unclipped = report_unclipped

    def site_plan(self, info: RoundInfo) -> StagePlan:
        return ClipPlan(self.norm, self.equal_weights, self.report_unclipped)

    def admit(self, reply: SiteReply, info: RoundInfo) -> SiteReply:
        if reply.update is None:
            return reply
        clipped, _ = clip_l2(reply.update, self.norm)
        return dataclasses.replace(reply, update=clipped, weight=1.0 if self.equal_weights else reply.weight)

    def state_dict(self) -> dict[str, Any]:
        return {"norm": self.norm}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.norm = float(state["norm"])
