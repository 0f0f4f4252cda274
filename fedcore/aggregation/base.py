"""Aggregation as composable stages (after TensorFlow Federated's aggregator factories).

A stage has a site-side part (`encode`: what a site does to its update before sending it)
and a server-side part (`start` an `Accumulator`, `add` each arriving contribution, take the
`result`). Wrappers such as clipping, noise, quantisation and masking wrap an inner stage;
the leaves sum. The server's memory grows with the model, not with the number of sites:
contributions are folded into running sums as they arrive.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from fedcore.tensors import Arrays


@dataclass(frozen=True)
class Aggregate:
    mean: Arrays  # weighted mean of the updates
    total_weight: float
    count: int  # contributions folded in
    measurements: dict[str, float] = field(default_factory=dict)


class Accumulator(abc.ABC):
    @abc.abstractmethod
    def add(self, contribution: Arrays, weight: float) -> None:
        """Fold in one site's contribution (as produced by the stage's `encode`)."""

    @abc.abstractmethod
    def result(self) -> Aggregate:
        """The aggregate of everything added so far."""


class AggregationStage(abc.ABC):
    @abc.abstractmethod
    def encode(self, update: Arrays, weight: float) -> Arrays:
        """Site side: turn an update into what the site sends."""

    @abc.abstractmethod
    def start(self, template: Arrays) -> Accumulator:
        """Server side: an empty accumulator for updates shaped like `template`."""
