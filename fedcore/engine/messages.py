"""What the Coordinator and a Site say to each other, whatever carries it."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from fedcore.aggregation import RefusalCode, StagePlan
from fedcore.tensors import Arrays

Scalar = int | float | bool | str
Config = dict[str, Scalar]
# What a site-supplied metric may be called: its names reach logs, records and files.
METRIC_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


class InstructionKind(enum.Enum):
    FIT = "fit"
    EVALUATE = "evaluate"
    STAGE = "stage"  # an aggregation stage's exchange without the model (e.g. SecAgg+ keys)
    STATISTICS = "statistics"  # before round 1: the task's statistics vector (Task.statistics)


@dataclass(frozen=True)
class Instruction:
    kind: InstructionKind
    round: int
    parameters: Arrays  # the global model (empty for a STAGE exchange)
    config: Config = field(default_factory=dict)  # training settings (epochs, lr, seed, ...)
    attempt: int = 1  # > 1 when the round is being retried
    message: object | None = None  # the stage's own message (e.g. SecAgg+ routed shares)
    plan: tuple[StagePlan, ...] = ()  # FIT: what each aggregation stage asks of the site
    exchange: str = ""  # which exchange of the round this is ("fit", "advertise", ...)


@dataclass(frozen=True)
class Reply:
    site: str
    kind: InstructionKind
    round: int
    num_examples: int = 0
    update: Arrays | None = None  # FIT: the encoded update (parameters after training - global)
    metrics: dict[str, float] = field(default_factory=dict)
    refusal: str | None = None  # set when the site declined or failed the instruction
    refusal_code: RefusalCode | None = None  # why, as a code (set with `refusal`)
    message: object | None = None  # the site's stage message (e.g. a masked input)
