"""An exact, order-independent weighted sum of updates in O(model) memory.

The server folds each reply the moment it arrives, so that its memory does not grow with the
number of sites. Floating-point addition is not associative, so a float sum folded in
arrival order would make the model depend on timing. Each weighted value is instead rounded
once, on its own, to a fixed grid chosen before the round from public facts (the model's
scale, the bound on a weight, the number of sites), and the integers are summed exactly: the
total, and so the model, is the same for every arrival order, to the bit.

The integer total of a coordinate is held in two limbs, `high * 2**31 + low` with
0 <= low < 2**31 (int64 and uint32: 12 bytes a parameter; carries are moved after every
fold, so the pair is a function of the total alone). That leaves about 94 bits for a value:
`GUARD` bits of headroom above the model's scale, the weight bound and the site count take
what they need, and the rest is precision. With 1,000 sites and weights up to 100,000, a
coordinate's mean is exact to about 2**-36 of the model's scale (float32 resolves 2**-24);
`fraction_bits` is recorded with each round.

A small vector (at most SMALL values: a linear model, the statistics exchange's counts and
sums of squares) is not put on a grid: every weighted reply is kept and each coordinate is
summed by `math.fsum`, which is exact and correctly rounded whatever the magnitudes and the
order, at a memory of sites x SMALL values.
"""

from __future__ import annotations

import math

import numpy as np

from fedcore.errors import ProtocolError
from fedcore.tensors import Arrays

GUARD = 30  # an update may be up to 2**GUARD times the model's scale; larger is refused
LOW_BITS = 31
BLOCK = 1 << 16  # values folded at a time: temporaries stay small whatever the model
SMALL = 1024


def model_scale(model: Arrays) -> float:
    """The power of two at or above the model's largest magnitude (at least 1): the grid is
    set relative to it, so a model of any scale gets the same relative precision."""
    largest = max((float(np.max(np.abs(a))) for a in model.values() if a.size), default=0.0)
    return float(2.0 ** math.ceil(math.log2(max(largest, 1.0))))


class ExactSum:
    """Sum of weight x update over the replies of one round, exact and commutative."""

    def __init__(self, model: Arrays, *, max_weight: float, sites: int) -> None:
        self.scale = model_scale(model)
        self.limit = self.scale * 2.0**GUARD
        self.max_weight = max_weight
        weight_bits = math.ceil(math.log2(max(max_weight, 1.0)))
        site_bits = math.ceil(math.log2(max(sites, 2)))
        # |high| per value <= 2**(GUARD + weight_bits + fraction_bits - LOW_BITS); n of them < 2**62.
        self.fraction_bits = 62 + LOW_BITS - GUARD - weight_bits - site_bits
        self.sites = sites
        self.small = sum(v.size for v in model.values()) <= SMALL
        self.kept: list[dict[str, np.ndarray]] = []  # a small vector's weighted replies
        grid = {} if self.small else model
        self.high = {k: np.zeros(v.shape, dtype=np.int64) for k, v in grid.items()}
        self.low = {k: np.zeros(v.shape, dtype=np.uint32) for k, v in grid.items()}
        self.shapes = {k: v.shape for k, v in model.items()}
        self.weights: list[float] = []

    @property
    def count(self) -> int:
        return len(self.weights)

    @property
    def weight(self) -> float:
        return math.fsum(self.weights)  # correctly rounded: independent of order too

    def add(self, update: Arrays, weight: float) -> None:
        """Fold weight x update in; ProtocolError (and nothing folded) if it is out of range."""
        if not 0 < weight <= self.max_weight:
            raise ProtocolError(f"a weight of {weight} is outside (0, {self.max_weight}]")
        if self.count == self.sites:
            raise ProtocolError(f"more than the {self.sites} replies the grid was sized for")
        if self.small:
            self.kept.append({k: v.astype(np.float64) * weight for k, v in update.items()})
            self.weights.append(weight)
            return
        for name, values in update.items():
            if values.size and max(float(np.max(values)), -float(np.min(values))) > self.limit:
                raise ProtocolError(
                    f"update {name!r} exceeds 2**{GUARD} times the model's scale ({self.scale:g})"
                )
        factor = weight * 2.0 ** (self.fraction_bits - LOW_BITS) / self.scale
        for name, values in update.items():
            flat, high, low = values.reshape(-1), self.high[name].reshape(-1), self.low[name].reshape(-1)
            for start in range(0, flat.size, BLOCK):
                part = slice(start, start + BLOCK)
                scaled = flat[part].astype(np.float64) * factor  # in units of 2**LOW_BITS grid steps
                whole = np.floor(scaled)
                # The rest is exact in float64 (a multiple of scaled's ulp below 2**31); rounding
                # it is the value's one rounding, to the grid.
                rest = np.rint((scaled - whole) * 2.0**LOW_BITS).astype(np.int64) + low[part]
                high[part] += whole.astype(np.int64) + (rest >> LOW_BITS)
                low[part] = rest & ((1 << LOW_BITS) - 1)
        self.weights.append(weight)

    def total(self, *, final: bool = False) -> Arrays:
        """The sum of weight x update as float64 (one rounding of the exact total). `final`:
        the last read: the accumulator becomes the total (its high limb holds it, its low one is
        freed), so the conversion never holds the accumulator and a float64 sum at once."""
        if self.small:
            return {
                k: np.array(
                    [math.fsum(c) for c in zip(*(r[k].ravel() for r in self.kept), strict=True)]
                ).reshape(shape)
                if self.kept
                else np.zeros(shape)
                for k, shape in self.shapes.items()
            }
        step = self.scale * 2.0**-self.fraction_bits
        out = {}
        for name in list(self.high):
            high, low = (
                (self.high.pop(name), self.low.pop(name)) if final else (self.high[name], self.low[name])
            )
            # Final: the float64 total is written over its own int64 limb, block by block
            # (each block is read before it is overwritten): no second model-sized array.
            value = high.view(np.float64) if final else np.empty(high.shape)
            whole, rest, into = high.reshape(-1), low.reshape(-1), value.reshape(-1)
            for start in range(0, whole.size, BLOCK):
                part = slice(start, start + BLOCK)
                block = whole[part].astype(np.float64)
                block *= 2.0**LOW_BITS
                block += rest[part]
                block *= step
                into[part] = block
            out[name] = value
        return out
