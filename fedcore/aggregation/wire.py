"""The stage plan and stage messages <-> their protocol messages (used by both runtimes)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from fedcore.aggregation.plans import (
    CentralNoisePlan,
    ClipPlan,
    DistributedNoisePlan,
    QuantizePlan,
    SampleDPPlan,
    StagePlan,
    StatisticsNoisePlan,
    StatisticsScalePlan,
)
from fedcore.errors import ProtocolError
from fedcore.proto.v1 import federation_pb2 as pb
from fedcore.secagg import wire as secagg_wire
from fedcore.secagg.packing import MIN_BITS
from fedcore.tensors import Arrays

MAX_PLAN_ITEMS = 16


def plan_to_wire(plan: Iterable[StagePlan]) -> list[pb.StagePlan]:
    out = []
    for item in plan:
        if isinstance(item, ClipPlan):
            out.append(pb.StagePlan(clip=pb.ClipPlan(**vars(item))))
        elif isinstance(item, SampleDPPlan):
            fields = {k: v for k, v in vars(item).items() if v is not None}
            out.append(pb.StagePlan(sample_dp=pb.SampleDPPlan(**fields)))
        elif isinstance(item, CentralNoisePlan):
            out.append(pb.StagePlan(central_noise=pb.CentralNoisePlan(**vars(item))))
        elif isinstance(item, DistributedNoisePlan):
            out.append(pb.StagePlan(distributed_noise=pb.DistributedNoisePlan(**vars(item))))
        elif isinstance(item, QuantizePlan):
            out.append(pb.StagePlan(quantize=pb.QuantizePlan(**vars(item))))
        elif isinstance(item, StatisticsNoisePlan):
            out.append(pb.StagePlan(statistics_noise=pb.StatisticsNoisePlan(**vars(item))))
        elif isinstance(item, StatisticsScalePlan):
            out.append(pb.StagePlan(statistics_scale=pb.StatisticsScalePlan(**vars(item))))
        else:
            raise TypeError(f"not a stage plan item: {type(item).__name__}")
    return out


def plan_from_wire(items: Iterable[pb.StagePlan]) -> tuple[StagePlan, ...]:
    """The typed plan; ProtocolError for an unknown stage or a non-finite number."""
    out: list[StagePlan] = []
    for item in items:
        if len(out) >= MAX_PLAN_ITEMS:
            raise ProtocolError(f"a stage plan of more than {MAX_PLAN_ITEMS} items")
        which = item.WhichOneof("stage")
        if which == "clip":
            c = item.clip
            out.append(ClipPlan(c.norm, c.equal_weights, c.report_unclipped))
        elif which == "sample_dp":
            s = item.sample_dp
            noise = s.WhichOneof("noise")
            out.append(
                SampleDPPlan(
                    max_grad_norm=s.max_grad_norm,
                    rounds=s.rounds,
                    delta=s.delta,
                    run=s.run,
                    sample_rate=s.sample_rate,
                    local_steps=s.local_steps,
                    accountant=s.accountant,
                    adjacency=s.adjacency,
                    expected_batch=s.expected_batch,
                    noise_multiplier=s.noise_multiplier if noise == "noise_multiplier" else None,
                    target_epsilon=s.target_epsilon if noise == "target_epsilon" else None,
                    ghost_clipping=s.ghost_clipping,
                    secure_rng=s.secure_rng,
                    statistics_noise=s.statistics_noise or None,
                )
            )
        elif which == "central_noise":
            out.append(CentralNoisePlan(item.central_noise.delta, item.central_noise.run))
        elif which == "distributed_noise":
            d = item.distributed_noise
            if not (MIN_BITS <= d.bits <= 32 or d.bits == 64):
                raise ProtocolError(f"a distributed noise plan needs 16 to 32 or 64 bits, got {d.bits}")
            out.append(
                DistributedNoisePlan(
                    d.clip_norm, d.scale, d.sigma, d.delta, d.run, d.secure_rng, d.bits, d.rotation
                )
            )
        elif which == "quantize":
            q = item.quantize
            out.append(QuantizePlan(q.clip_range, q.step, q.max_examples, q.bits, q.equal_weights))
        elif which == "statistics_noise":
            n = item.statistics_noise
            out.append(StatisticsNoisePlan(n.noise_multiplier, n.delta, n.run, n.secure_rng))
        elif which == "statistics_scale":
            out.append(StatisticsScalePlan(item.statistics_scale.scale))
        else:
            raise ProtocolError(f"unknown stage in the plan: {which!r}")
        numbers = [v for v in vars(out[-1]).values() if isinstance(v, float)]
        if not all(math.isfinite(v) for v in numbers):
            raise ProtocolError(f"non-finite number in the {which} plan")
    return tuple(out)


def message_to_wire(message: object) -> pb.SecAgg:
    return secagg_wire.to_wire(message)


def message_from_wire(message: pb.SecAgg, *, site: str, payload: Arrays | None = None) -> object:
    return secagg_wire.from_wire(message, site=site, payload=payload)


def message_payload(message: object) -> Arrays | None:
    """The arrays a stage message travels with (a masked input's vector), if any."""
    return secagg_wire.payload_of(message)
