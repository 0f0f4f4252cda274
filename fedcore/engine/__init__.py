"""The round engine: Coordinator and Site runtime, behind a Transport."""

from fedcore.engine.coordinator import Coordinator
from fedcore.engine.messages import Instruction, InstructionKind, Reply
from fedcore.engine.records import MemoryStore, RoundRecord, RoundStore, RunResult
from fedcore.engine.run_state import RunState
from fedcore.engine.site import Site
from fedcore.engine.statistics import RoundFailed
from fedcore.engine.transport import Transport

__all__ = [
    "Coordinator",
    "Instruction",
    "InstructionKind",
    "MemoryStore",
    "Reply",
    "RoundFailed",
    "RoundRecord",
    "RoundStore",
    "RunResult",
    "RunState",
    "Site",
    "Transport",
]
