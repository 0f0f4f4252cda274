"""What the Coordinator and a Site say to each other, whatever carries it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from fedcore.tensors import Arrays

Scalar = int | float | bool | str
Config = dict[str, Scalar]


class InstructionKind(enum.Enum):
    FIT = "fit"
    EVALUATE = "evaluate"
    SECAGG = "secagg"  # a secure-aggregation stage other than the masked input (which is FIT)


@dataclass(frozen=True)
class Instruction:
    kind: InstructionKind
    round: int
    parameters: Arrays  # the global model
    config: Config = field(default_factory=dict)
    attempt: int = 1  # > 1 when the round is being retried
    secagg: object | None = None  # the secure-aggregation stage message, when on


@dataclass(frozen=True)
class Reply:
    site: str
    kind: InstructionKind
    round: int
    num_examples: int = 0
    update: Arrays | None = None  # FIT: the encoded update (parameters after training - global)
    metrics: dict[str, float] = field(default_factory=dict)
    refusal: str | None = None  # set when the site declined or failed the instruction
    secagg: object | None = None  # the site's secure-aggregation stage message
