"""Fixed-point encoding for the secure sum. A site sends one integer vector modulo 2**bits:
[clip(update) x w, w], quantized with stochastic rounding at the round's step (see
fedcore.secagg.contribution), where w in (0, 1] is its example count over the public bound
`max_examples` (capped at 1), or 1 with equal weights. No count leaves a site in the clear:
the server dequantizes the decrypted sum into [sum w x, sum w], the weighted mean is their
ratio, and it learns only the total. The price is precision: w x has log2(max_examples /
examples) fewer significant bits than x (`simulations/benchmarks/secagg_weight_precision.py`).

Every entry is at most max(clip_range, 1) in magnitude, so the step chosen for the sampled
sites' count can never let the sum wrap around.
"""

from __future__ import annotations

import numpy as np

from fedcore.aggregation.base import Aggregate, RoundInfo, Section, Stage
from fedcore.aggregation.plans import QuantizePlan, StagePlan
from fedcore.secagg.contribution import step_for_round
from fedcore.secagg.quantize import dequantize
from fedcore.tensors import unflatten


class Quantize(Stage):
    name = "quantize"
    section = Section.SECURE_AGGREGATION

    def __init__(self, *, clip_range: float, bits: int, max_examples: int, equal_weights: bool) -> None:
        self.clip_range = clip_range
        self.bits = bits
        self.max_examples = max_examples
        self.equal_weights = equal_weights

    def step(self, info: RoundInfo) -> float:
        return step_for_round(len(info.sampled), clip=self.clip_range, bits=self.bits)

    def site_plan(self, info: RoundInfo) -> StagePlan:
        return QuantizePlan(
            clip_range=self.clip_range,
            step=self.step(info),
            max_examples=self.max_examples,
            bits=self.bits,
            equal_weights=self.equal_weights,
        )

    def finish(self, aggregate: Aggregate, info: RoundInfo) -> Aggregate:
        if aggregate.integers is None:  # nothing was summed (e.g. a noise-only round)
            return aggregate
        step = self.step(info)
        flat = dequantize(aggregate.integers, step=step)
        weight, slack = float(flat[-1]), aggregate.count * step  # stochastic rounding: a step each
        # Honest inputs have 0 < w <= 1 and |w x| <= w clip_range. Masked, no single input can
        # be checked (that would take range proofs), but a sum outside these bounds proves a
        # lie (e.g. a negative weight): the attempt fails instead of becoming the model.
        if not 0 < weight <= aggregate.count + slack:
            # No figures in the reason: it is recorded, and under central DP the sum is not yet noised.
            aggregate.rejected = (
                "the decoded sum of weights is outside (0, count]: a site lied under the mask"
            )
        elif float(np.abs(flat[:-1]).max(initial=0.0)) > weight * self.clip_range + slack:
            aggregate.rejected = "the decoded sum exceeds what the weights allow: a site lied under the mask"
        if aggregate.rejected is not None:
            flat = np.zeros_like(flat)
            weight = 1.0  # harmless for the stages after: the pipeline discards the attempt
        aggregate.sum = unflatten(flat[:-1], info.model)
        aggregate.weight = weight
        return aggregate
