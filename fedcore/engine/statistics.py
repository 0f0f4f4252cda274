"""The statistics exchange: before round 1, a task that asks for federated statistics
(`Task.statistics_size() > 0`, e.g. tabular's standardisation) gets their sum over the
sites, through the statistics pipeline (fedcore.aggregation.statistics: plain sum, secure
sum, DP noise). The sum is part of the run's state and goes to every site with every
instruction after it (`STATISTICS_KEY`), so a site that (re)connects later, a virtual site
built afresh and a resumed run all standardise alike."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from fedcore.aggregation import Drop, Exchange, Pipeline, RoundInfo, SiteReply, SiteRequest
from fedcore.config import Experiment
from fedcore.engine.messages import Config, Instruction, InstructionKind, Reply
from fedcore.engine.site import STATISTICS_ARRAY, STATISTICS_KEY
from fedcore.engine.transport import Transport
from fedcore.errors import FedcoreError
from fedcore.seeding import derive_seed

log = logging.getLogger(__name__)

Gather = Callable[
    [str, list[str], Callable[[str], Instruction], Callable[[Reply], None]], Awaitable[dict[str, Drop]]
]


class RoundFailed(FedcoreError):
    """A round (or the statistics exchange) could not gather enough replies within its retries."""


async def gather_statistics(
    experiment: Experiment,
    size: int,
    pipeline: Pipeline,
    transport: Transport,
    run_id: str,
    gather: Gather,
) -> np.ndarray:
    """The sum of every available site's statistics vector (`size` long); retried like a round."""
    fed = experiment.federation
    template = {STATISTICS_ARRAY: np.zeros(size)}
    config: Config = {"seed": derive_seed(experiment.seed, "statistics")}
    for attempt in range(1, fed.max_round_retries + 2):
        await transport.wait_for_sites((fed.start_sites or fed.min_sites) if attempt == 1 else fed.min_sites)
        available = sorted(transport.available())
        info = RoundInfo(run_id, 0, attempt, tuple(available), len(available), template, experiment.seed)

        aggregate = await pipeline.aggregate(info, _exchange(gather, attempt, config))
        total = None if aggregate is None or aggregate.sum is None else aggregate.sum[STATISTICS_ARRAY]
        if (
            aggregate is None
            or aggregate.rejected is not None
            or aggregate.count < fed.min_sites
            or total is None
            or not np.isfinite(total).all()
        ):
            log.warning(
                "statistics attempt %d: %d of %d sites' statistics summed, need %d; retrying",
                attempt,
                aggregate.count if aggregate else 0,
                len(available),
                fed.min_sites,
            )
            continue
        for lost, drop in aggregate.dropped.items():
            log.info("statistics: dropped %s (%s)", lost, drop)
        log.info("statistics: summed over %d sites (%s)", aggregate.count, pipeline)
        return np.asarray(total, dtype=np.float64)
    raise RoundFailed(
        f"the statistics exchange got fewer than {fed.min_sites} sites in {fed.max_round_retries + 1} attempts"
    )


def _exchange(gather: Gather, attempt: int, config: Config) -> Exchange:
    """The statistics pipeline's Exchange: its requests as STATISTICS (or STAGE) instructions."""

    def run(
        exchange: str,
        sites: Sequence[str],
        request: Callable[[str], SiteRequest],
        accept: Callable[[SiteReply], None],
    ) -> Awaitable[dict[str, Drop]]:
        def instruction_for(site: str) -> Instruction:
            r = request(site)
            kind = InstructionKind.STATISTICS if r.train else InstructionKind.STAGE
            return Instruction(kind, 0, {}, config if r.train else {}, attempt, r.message, r.plan, exchange)

        def on_reply(reply: Reply) -> None:
            accept(
                SiteReply(reply.site, reply.update, float(reply.num_examples), reply.metrics, reply.message)
            )

        return gather(exchange, list(sites), instruction_for, on_reply)

    return run


def statistics_config(total: np.ndarray | None) -> Config:
    """What an instruction carries of the run's statistics (nothing before they exist)."""
    return {} if total is None else {STATISTICS_KEY: json.dumps([float(v) for v in total])}
