"""Composable aggregation stages."""

from fedcore.aggregation.base import Accumulator, Aggregate, AggregationStage
from fedcore.aggregation.mean import WeightedMean

__all__ = ["Accumulator", "Aggregate", "AggregationStage", "WeightedMean"]
