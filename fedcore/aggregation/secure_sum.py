"""The SecAgg+ leaf: the server's side of one secure sum, five exchanges with the sites.

Advertise keys, reveal nonces (the graph's randomness), share keys, fit-and-mask (the global model and the stage plan go out with
the routed shares; a masked integer vector comes back), unmask. The server's stage states
(fedcore.secagg.stages) check every message and keep only what the protocol allows; an
abort at any stage fails the attempt, which the engine retries. The result is the sum
modulo 2**bits of the masked inputs, still encoded: the wrapper that encoded the inputs
(quantize, or distributed noise) decodes it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fedcore.aggregation.base import (
    Aggregate,
    Drop,
    DropReason,
    Leaf,
    RoundContext,
    RoundInfo,
    Section,
    SiteReply,
    SiteRequest,
)
from fedcore.config import SecureAggregationConfig
from fedcore.errors import ProtocolError
from fedcore.secagg.client import MAX_ATTEMPTS
from fedcore.secagg.common import MIN_COHORT, ProtocolAbort, RoundParams
from fedcore.secagg.graph import default_degree, default_threshold, neighbour_graph, safe_threshold
from fedcore.secagg.stages.advertise import ServerAdvertise
from fedcore.secagg.stages.messages import (
    AdvertiseKeys,
    ConsistencySignature,
    MaskedInput,
    NonceReveal,
    ShareKeys,
    UnmaskShares,
)

log = logging.getLogger(__name__)

EXCHANGES = (
    "advertise",
    "reveal",
    "share_keys",
    "masked_input",
    "consistency",
    "unmask",
)  # in protocol order


def round_params(
    config: SecureAggregationConfig, info: RoundInfo, *, bits: int, length: Callable[[int], int] | None = None
) -> RoundParams:
    sampled = list(info.sampled)
    n, session = len(sampled), f"{info.run_id}/{info.round}/{info.attempt}"
    # Sites refuse a graph sparser than the default (the nonces they reveal draw it), and a
    # threshold below what the colluding fraction needs at their degree: a denser graph
    # where no threshold up to the degree is enough.
    degree = max(config.neighbors or 0, default_degree(n))
    while True:
        # Its degrees: the same for every draw of the graph (`neighbour_graph`).
        degrees = {len(peers) for peers in neighbour_graph(sampled, degree, session=session).values()}
        safe = [safe_threshold(n, k, config.colluding_fraction, attempts=MAX_ATTEMPTS) for k in degrees]
        if all(t is not None for t in safe) or degree >= n - 1:
            break
        degree += 1
    needed = max((t for t in safe if t is not None), default=max(map(default_threshold, degrees)))
    threshold = min(max(config.threshold or 0, needed), min(degrees))
    integers = length(info.dimension) if length else info.dimension + 1  # the update, then its weight
    return RoundParams(info.round, tuple(sampled), degree, threshold, integers, bits, session)


class SecureSum(Leaf):
    name = "secure_sum"
    section = Section.SECURE_AGGREGATION
    # Per-site federated metrics (and the counts that weigh them) are more than the sum: the
    # server evaluates on its own held-out data only.
    withholds_evaluation = "secure aggregation"

    def __init__(
        self, config: SecureAggregationConfig, *, bits: int, length: Callable[[int], int] | None = None
    ) -> None:
        self.config = config
        self.bits = bits
        self.length = length  # integers per input for a model's dimension (default: d + 1)

    async def collect(self, context: RoundContext) -> Aggregate | None:
        info = context.info
        if len(info.sampled) < MIN_COHORT:
            # Sites refuse a smaller sum (of two, each would learn the other's input). A
            # round that completes with any sample (user-central DP) still releases its
            # noise alone, so sampling stays what the accountant assumes.
            need = f"secure aggregation needs {MIN_COHORT} sites"
            if not context.completes_any_sample:
                log.warning("round %d: %d site(s) sampled, %s", info.round, len(info.sampled), need)
                return None
            drop = Drop(DropReason.NOT_AGGREGATED, "advertise", need)
            zeros = {k: np.zeros(v.shape) for k, v in info.model.items()}
            return Aggregate(
                sum=zeros, weight=0.0, count=0, contributors=[], dropped=dict.fromkeys(info.sampled, drop)
            )
        params = round_params(self.config, info, bits=self.bits, length=self.length)
        dropped: dict[str, Drop] = {}
        stages: dict[str, dict[str, Any]] = {}
        site_metrics: dict[str, dict[str, float]] = {}

        async def exchange(
            name: str,
            sites: list[str],
            make: Callable[[str], SiteRequest],
            kind: type,
            fold: Callable[[Any], None] | None = None,
        ) -> list[Any]:
            """The replies, sorted by site; or, with `fold`, each handed to it as it arrives
            and none kept (the masked inputs: the server holds their sum, not one a site)."""
            got: dict[str, Any] = {}

            def keep(reply: SiteReply) -> None:
                message = reply.message
                if not isinstance(message, kind):
                    raise ProtocolError(f"expected {kind.__name__} in the {name} exchange")
                if getattr(message, "site", None) != reply.site:  # a site speaks for itself only: dropped
                    raise ProtocolError(f"{kind.__name__} in another site's name")
                metrics = dict(reply.metrics or {})  # what can raise, before the fold
                if fold is not None:
                    fold(message)
                    message = None
                got[reply.site] = message
                if metrics:
                    site_metrics[reply.site] = metrics

            started = time.perf_counter()
            lost = await context.exchange(name, sites, make, keep)
            stages[name] = {
                "sites": len(sites),
                "replied": len(got),
                "dropped": len(lost),
                "seconds": time.perf_counter() - started,
            }
            # A site lost after its masked input has it in the sum already.
            late = name in ("consistency", "unmask")
            dropped.update({s: dataclasses.replace(d, aggregated=late) for s, d in lost.items()})
            return [got[s] for s in sorted(got)]  # the same state machine input whatever the arrival order

        def send(messages: dict[str, Any]) -> Callable[[str], SiteRequest]:
            return lambda site: SiteRequest(train=False, message=messages[site])

        try:
            keys = await exchange(
                "advertise", list(info.sampled), lambda s: SiteRequest(False, params), AdvertiseKeys
            )
            reveal, server1b = ServerAdvertise(params).collect(keys)
            nonces = await exchange("reveal", sorted(reveal), send(reveal), NonceReveal)
            forwarded, server2 = server1b.collect(nonces)
            shares = await exchange("share_keys", sorted(forwarded), send(forwarded), ShareKeys)
            routed, server3 = server2.collect(shares)
            plan = context.plan(info)
            summing = server3.summing()
            await exchange(
                "masked_input",
                sorted(routed),
                lambda s: SiteRequest(train=True, message=routed[s], plan=plan),
                MaskedInput,
                fold=summing.add,
            )
            agree, server4 = summing.close()
            context.before_release(len(server4.cohort))  # before any sum is decrypted
            # A site whose message was malformed is left out by name, not the round aborted.
            bad = {
                s: Drop(DropReason.BAD_REPLY, "secure aggregation", why)
                for s, why in server4.rejected.items()
            }
            dropped.update(bad)
            signed = await exchange("consistency", sorted(agree), send(agree), ConsistencySignature)
            requests, server5 = server4.collect(signed)
            answers = await exchange("unmask", sorted(requests), send(requests), UnmaskShares)
            started = time.perf_counter()
            total = server5.collect(answers)
            # Sites named at the consistency check or unmask (a garbled share, a false complaint).
            dropped.update(
                {
                    s: Drop(DropReason.BAD_REPLY, "secure aggregation", why, aggregated=s in server4.cohort)
                    for s, why in server5.rejected.items()
                }
            )
        except ProtocolAbort as abort:
            log.warning(
                "round %d attempt %d: secure aggregation aborted: %s", info.round, info.attempt, abort
            )
            culprit = abort.aborted.culprit
            if culprit is None:
                return None
            # Named: the attempt fails, and the culprit is left out of the retry and the run.
            dropped[culprit] = Drop(DropReason.BAD_REPLY, "secure aggregation", str(abort))
            return Aggregate(None, 0.0, 0, [], dropped, rejected=f"secure aggregation aborted: {abort}")
        stages["unmask"]["seconds"] += time.perf_counter() - started
        contributors = sorted(server4.cohort)
        aggregate = Aggregate(
            sum=None,
            weight=0.0,
            count=len(contributors),
            contributors=contributors,
            dropped=dropped,
            integers=total,
            site_metrics={s: site_metrics[s] for s in contributors if s in site_metrics},
        )
        aggregate.measure(
            self.section,
            masked=len(contributors),
            recovered=len(set(routed) - set(contributors)),  # shared keys, then dropped
            threshold=params.threshold,
            neighbors=min(len(p) for p in server2.params.neighbours.values()),
            stages=stages,
        )
        return aggregate
