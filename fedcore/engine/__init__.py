"""The round engine: Coordinator and Site runtime, behind a Transport."""

from fedcore.engine.coordinator import Coordinator, RoundFailed, RunResult
from fedcore.engine.messages import Instruction, InstructionKind, Reply
from fedcore.engine.records import DirectoryStore, MemoryStore, RoundRecord, RoundStore
from fedcore.engine.site import Site
from fedcore.engine.transport import Transport

__all__ = [
    "Coordinator",
    "DirectoryStore",
    "Instruction",
    "InstructionKind",
    "MemoryStore",
    "Reply",
    "RoundFailed",
    "RoundRecord",
    "RoundStore",
    "RunResult",
    "Site",
    "Transport",
]
