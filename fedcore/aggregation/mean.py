"""The plain leaf: an example-weighted sum, folded exactly as replies arrive (`exact_sum`)."""

from __future__ import annotations

from fedcore.aggregation.base import MAX_WEIGHT, Aggregate, Leaf, RoundContext, SiteReply, SiteRequest
from fedcore.aggregation.exact_sum import ExactSum
from fedcore.errors import ProtocolError
from fedcore.tensors import Arrays, check_finite, check_like


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
    """Sites send their update as is; the server sums weight x update and the weights as
    each reply arrives. Memory is one accumulator (12 bytes a parameter), whatever the
    number of sites, and the sum does not depend on the order the replies arrive in."""

    name = "mean"

    async def collect(self, context: RoundContext) -> Aggregate:
        info = context.info
        total = ExactSum(info.model, max_weight=info.max_weight, sites=len(info.sampled))
        contributors: list[str] = []
        metrics: dict[str, dict[str, float]] = {}

        def accept(reply: SiteReply) -> None:
            checked(reply, info.model)
            reply = context.admit(reply)
            assert reply.update is not None
            total.add(reply.update, reply.weight)
            contributors.append(reply.site)
            metrics[reply.site] = dict(reply.metrics)

        plan = context.plan(info)
        dropped = await context.exchange(
            "fit", info.sampled, lambda site: SiteRequest(train=True, plan=plan), accept
        )
        aggregate = Aggregate(
            sum=total.total(final=True),
            weight=total.weight,
            count=total.count,
            contributors=sorted(contributors),
            dropped=dropped,
            site_metrics={s: metrics[s] for s in sorted(metrics)},
        )
        if not total.small:
            aggregate.measure(self.section, fraction_bits=total.fraction_bits)
        return aggregate
