"""A round under SecAgg+: the Coordinator's four exchanges with the sites, one per stage.

Advertise keys, share keys, fit-and-mask (the global model goes out with the routed shares;
a masked, quantized, weighted update comes back), unmask. The server's stage states check
every message and keep only what the protocol allows; an abort at any stage (too many
dropouts, a bad message) fails the attempt, which the Coordinator retries. The server only
ever holds the sum: it dequantizes it into the weighted mean update for the strategy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedcore.engine.messages import Instruction, InstructionKind, Reply
from fedcore.errors import ProtocolError
from fedcore.privacy.run_privacy import TargetReached
from fedcore.secagg.common import ProtocolAbort, RoundParams
from fedcore.secagg.contribution import length, mean_update, step_for_round, unflatten
from fedcore.secagg.graph import default_degree, default_threshold, neighbour_graph
from fedcore.secagg.quantize import UInt, dequantize
from fedcore.secagg.stages.advertise import AdvertiseKeys, ServerAdvertise
from fedcore.secagg.stages.masked_input import MaskedInput
from fedcore.secagg.stages.share_keys import ShareKeys
from fedcore.secagg.stages.unmask import UnmaskShares
from fedcore.tensors import Arrays

if TYPE_CHECKING:
    from fedcore.engine.coordinator import Coordinator

log = logging.getLogger(__name__)


def round_params(c: Coordinator, number: int, attempt: int, sampled: list[str]) -> RoundParams:
    cfg = c.experiment.secure_aggregation
    degree = cfg.neighbors or default_degree(len(sampled))
    graph = neighbour_graph(sampled, degree, seed=c.experiment.seed, round_number=number * 1000 + attempt)
    smallest = min(len(peers) for peers in graph.values())
    threshold = min(cfg.threshold or default_threshold(smallest), smallest)
    return RoundParams(
        number, tuple(sampled), graph, threshold, length(c.parameters), c.experiment.secagg_bits
    )


@dataclass
class SecureSum:
    total: UInt  # the decrypted sum of the masked inputs, modulo 2**bits
    step: float  # the quantization step of the plain contributions
    masked: list[str]  # sites whose masked input is in the sum
    dropped: dict[str, str]
    metrics: dict[str, Any]
    fit_metrics: dict[str, dict[str, float]]  # site -> the metrics it sent with its masked input

    def mean(self, template: Arrays) -> tuple[Arrays, float]:
        """Plain (example-weighted) contributions: the weighted mean update and total weight."""
        return mean_update(dequantize(self.total, step=self.step), template)

    def sums(self, template: Arrays) -> tuple[Arrays, int]:
        """Equal-weight contributions (user-level DP): the summed update and the site count."""
        flat = dequantize(self.total, step=self.step)
        return unflatten(flat, template), round(float(flat[-1]))


async def secure_aggregate(
    c: Coordinator, number: int, attempt: int, sampled: list[str], dp_config: dict[str, Any]
) -> SecureSum | None:
    """The decrypted sum of the masked inputs of this round's sites; None on abort."""
    cfg = c.experiment.secure_aggregation
    params = round_params(c, number, attempt, sampled)
    step = step_for_round(len(sampled), clip=cfg.clip_range, bits=c.experiment.secagg_bits)
    dropped: dict[str, str] = {}
    stages: dict[str, dict[str, Any]] = {}
    fit_metrics: dict[str, dict[str, float]] = {}
    examples: dict[str, int] = {}  # what each site declares with its keys

    async def exchange(
        name: str, sites: list[str], make: Callable[[str], Instruction], kind: type
    ) -> list[Any]:
        got: list[Any] = []

        def keep(reply: Reply) -> None:
            if not isinstance(reply.secagg, kind):
                raise ProtocolError(f"expected {kind.__name__} in the {name} stage")
            got.append(reply.secagg)
            examples[reply.site] = reply.num_examples
            if reply.metrics:
                fit_metrics[reply.site] = dict(reply.metrics)

        started = time.perf_counter()
        lost = await c._gather(sites, make, keep)
        stages[name] = {
            "sites": len(sites),
            "replied": len(got),
            "dropped": len(lost),
            "seconds": time.perf_counter() - started,
        }
        dropped.update({site: f"{name}: {reason}" for site, reason in lost.items()})
        return got

    def secagg(message_for: Callable[[str], object]) -> Callable[[str], Instruction]:
        return lambda s: Instruction(InstructionKind.SECAGG, number, {}, {}, attempt, secagg=message_for(s))

    try:
        keys = await exchange("advertise", sampled, secagg(lambda s: params), AdvertiseKeys)
        forwarded, server = ServerAdvertise(params).collect(keys)
        shares = await exchange("share_keys", sorted(forwarded), secagg(lambda s: forwarded[s]), ShareKeys)
        routed, server3 = server.collect(shares)
        # Weights are example counts over the largest count declared this round (capped by the
        # configured bound), so the biggest site weighs 1 and 32-bit sums keep their precision.
        # A site that under-declares cannot exceed weight 1; one that over-declares only
        # coarsens everyone's weights. The counts are what plain FedAvg reveals anyway.
        declared = max((n for s, n in examples.items() if s in forwarded and n > 0), default=cfg.max_examples)
        config = {
            "secagg_clip": cfg.clip_range,
            "secagg_step": step,
            "secagg_max_examples": min(declared, cfg.max_examples),
        }

        def fit(s: str) -> Instruction:
            return Instruction(
                InstructionKind.FIT,
                number,
                c.parameters,
                {**c.fit_config(number, s), **config, **dp_config},
                attempt,
                secagg=routed[s],
            )

        masked = await exchange("masked_input", sorted(routed), fit, MaskedInput)
        if c.privacy is not None:
            try:
                c.privacy.check_decryption(len(masked))  # before any sum is decrypted
            except TargetReached as stop:
                log.warning("round %d: not unmasking: %s", number, stop)
                raise
        requests, server4 = server3.collect(masked)
        answers = await exchange("unmask", sorted(requests), secagg(lambda s: requests[s]), UnmaskShares)
        started = time.perf_counter()
        total = server4.collect(answers)
    except ProtocolAbort as abort:
        log.warning("round %d attempt %d: secure aggregation aborted: %s", number, attempt, abort)
        return None
    stages["unmask"]["seconds"] += time.perf_counter() - started
    metrics = {
        "masked": len(masked),
        "recovered": len(set(routed) - {m.site for m in masked}),  # shared keys, then dropped
        "threshold": params.threshold,
        "neighbors": min(len(p) for p in params.neighbours.values()),
        "stages": stages,
    }
    return SecureSum(total, step, [m.site for m in masked], dropped, metrics, fit_metrics)
