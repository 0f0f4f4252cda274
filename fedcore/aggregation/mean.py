"""The plain leaf: an example-weighted mean, kept as running float64 sums."""

from __future__ import annotations

import numpy as np

from fedcore.aggregation.base import Accumulator, Aggregate, AggregationStage
from fedcore.errors import ProtocolError
from fedcore.tensors import Arrays, check_finite, check_like


class WeightedMean(AggregationStage):
    """Sites send their update as is; the server sums weight x update and the weights."""

    def encode(self, update: Arrays, weight: float) -> Arrays:
        return update

    def start(self, template: Arrays) -> Accumulator:
        return _MeanAccumulator(template)


class _MeanAccumulator(Accumulator):
    def __init__(self, template: Arrays) -> None:
        self._template = template
        self._sums = {k: np.zeros(v.shape, dtype=np.float64) for k, v in template.items()}
        self._scratch = {k: np.empty(v.shape, dtype=np.float64) for k, v in template.items()}
        self._weight = 0.0
        self._count = 0

    def add(self, contribution: Arrays, weight: float) -> None:
        # Validate fully before touching the sums: a bad contribution changes nothing.
        check_like(contribution, self._template)
        check_finite(contribution)
        if not (np.isfinite(weight) and weight > 0):
            raise ProtocolError(f"contribution weight must be a positive number, got {weight}")
        for k, v in contribution.items():
            # weight * v into a reused float64 buffer, then add: no per-site allocations.
            np.multiply(v, weight, out=self._scratch[k])
            self._sums[k] += self._scratch[k]
        self._weight += weight
        self._count += 1

    def result(self) -> Aggregate:
        if self._count == 0:
            raise ValueError("no contributions to aggregate")
        mean = {k: s / self._weight for k, s in self._sums.items()}
        return Aggregate(mean=mean, total_weight=self._weight, count=self._count)
