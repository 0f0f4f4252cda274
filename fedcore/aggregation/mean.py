"""The plain leaf: an example-weighted sum, folded as replies arrive (float64 running sums)."""

from __future__ import annotations

import numpy as np

from fedcore.aggregation.base import Aggregate, Leaf, RoundContext, SiteReply, SiteRequest
from fedcore.errors import ProtocolError
from fedcore.tensors import Arrays, check_finite, check_like

# A site's weight is at most this: no site can claim an absurd count and replace the model.
MAX_WEIGHT = 10**9


def checked(reply: SiteReply, model: Arrays) -> Arrays:
    """A plain reply's update, once it is known to fit the model: a bad one changes nothing."""
    if reply.update is None or not 0 < reply.weight <= MAX_WEIGHT:
        raise ProtocolError(
            f"a fit reply needs an update and a weight in (0, {MAX_WEIGHT}], got {reply.weight}"
        )
    check_like(reply.update, model)
    check_finite(reply.update)
    return reply.update


class WeightedMean(Leaf):
    """Sites send their update as is; the server sums weight x update and the weights.
    Memory is one model's worth of float64, whatever the number of sites."""

    name = "mean"

    async def collect(self, context: RoundContext) -> Aggregate:
        info = context.info
        sums = {k: np.zeros(v.shape, dtype=np.float64) for k, v in info.model.items()}
        scratch = {k: np.empty(v.shape, dtype=np.float64) for k, v in info.model.items()}
        aggregate = Aggregate(sum=sums, weight=0.0, count=0, contributors=[])

        def accept(reply: SiteReply) -> None:
            checked(reply, info.model)
            reply = context.admit(reply)
            assert reply.update is not None
            for k, v in reply.update.items():
                np.multiply(v, reply.weight, out=scratch[k])  # no per-site allocation
                sums[k] += scratch[k]
            aggregate.weight += reply.weight
            aggregate.count += 1
            aggregate.contributors.append(reply.site)
            aggregate.site_metrics[reply.site] = dict(reply.metrics)

        plan = context.plan(info)
        aggregate.dropped = await context.exchange(
            "fit", info.sampled, lambda site: SiteRequest(train=True, plan=plan), accept
        )
        return aggregate
