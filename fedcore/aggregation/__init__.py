"""Aggregation as a pipeline of stages, built from the experiment in one place (`builder`)."""

from fedcore.aggregation.base import (
    MAX_WEIGHT,
    Aggregate,
    Drop,
    DropReason,
    Exchange,
    Leaf,
    RefusalCode,
    RoundContext,
    RoundInfo,
    Section,
    SiteReply,
    SiteRequest,
    Stage,
    StopRun,
)
from fedcore.aggregation.builder import build_pipeline
from fedcore.aggregation.pipeline import Pipeline
from fedcore.aggregation.plans import StagePlan
from fedcore.aggregation.site import Contribution, Encoded, Prepared, SiteStages, StageState

__all__ = [
    "MAX_WEIGHT",
    "Aggregate",
    "Contribution",
    "Drop",
    "DropReason",
    "Encoded",
    "Exchange",
    "Leaf",
    "Pipeline",
    "Prepared",
    "RefusalCode",
    "RoundContext",
    "RoundInfo",
    "Section",
    "SiteReply",
    "SiteRequest",
    "SiteStages",
    "Stage",
    "StagePlan",
    "StageState",
    "StopRun",
    "build_pipeline",
]
