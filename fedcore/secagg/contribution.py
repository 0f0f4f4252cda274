"""What a site feeds into secure aggregation, and how the server reads the sum.

A site's contribution is one vector, quantized: its clipped update times its weight, then
the weight itself, w in (0, 1] (the site's example count over a public cap). The secure sum is then
[sum w x, sum w], and the weighted mean update is their ratio, as in plain FedAvg. Every
entry is at most max(clip, 1) in magnitude, so `step_for_round` can pick a quantization
step at which the sum of all sampled sites cannot wrap around.
"""

from __future__ import annotations

import numpy as np

from fedcore.privacy.randomness import SecureRandom
from fedcore.secagg.quantize import UInt, quantize_into, step_for
from fedcore.tensors import Arrays


def weight(examples: int, max_examples: int) -> float:
    return min(examples, max_examples) / max_examples


def quantized_contribution(
    update: Arrays,
    template: Arrays,
    *,
    weight: float,
    clip: float,
    step: float,
    bits: int,
    rng: SecureRandom,
) -> UInt:
    """[clip(update) x weight, weight], quantized at `step` modulo 2**bits, as one vector."""
    out: UInt = np.empty(length(template), dtype=np.uint32 if bits == 32 else np.uint64)
    offset = 0
    for name, ref in template.items():
        values = np.asarray(update[name]).ravel()
        if values.size != ref.size:
            raise ValueError(f"update {name!r} has {values.size} values, the model {ref.size}")
        quantize_into(out[offset : offset + ref.size], values, scale=weight / step, clip=clip, rng=rng)
        offset += ref.size
    quantize_into(out[-1:], np.array([weight]), scale=1.0 / step, rng=rng)
    return out


def length(template: Arrays) -> int:
    return sum(a.size for a in template.values()) + 1


def step_for_round(sites: int, *, clip: float, bits: int) -> float:
    return step_for(sites * max(clip, 1.0), bits=bits)
