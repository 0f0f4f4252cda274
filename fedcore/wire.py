"""Engine messages <-> protocol messages, shared by the server and the site agent.

Nothing here does I/O: a message becomes a list of protocol messages (header first, then
the payload's chunks) and back.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedcore.engine.messages import Config, InstructionKind, Scalar
from fedcore.errors import ProtocolError
from fedcore.proto.v1 import federation_pb2 as pb
from fedcore.tensors import Arrays, chunks, encode

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 4 << 20  # every message is far smaller: payloads travel in 1 MiB chunks
MAX_CONFIG_ENTRIES = 256

KIND_TO_WIRE = {
    InstructionKind.FIT: pb.INSTRUCTION_KIND_FIT,
    InstructionKind.EVALUATE: pb.INSTRUCTION_KIND_EVALUATE,
}
KIND_FROM_WIRE = {v: k for k, v in KIND_TO_WIRE.items()}


def scalar_to_wire(value: Scalar) -> pb.Scalar:
    if isinstance(value, bool):
        return pb.Scalar(bool=value)
    if isinstance(value, int):
        return pb.Scalar(int=value)
    if isinstance(value, float):
        return pb.Scalar(double=value)
    if isinstance(value, str):
        return pb.Scalar(string=value)
    raise TypeError(f"cannot send {type(value).__name__} as a scalar")


def scalar_from_wire(value: pb.Scalar) -> Scalar:
    which = value.WhichOneof("value")
    if which is None:
        raise ProtocolError("empty scalar")
    result: Scalar = getattr(value, which)
    return result


def config_to_wire(target: pb.Scalar | object, config: Mapping[str, Scalar]) -> None:
    for key, value in config.items():
        target[key].CopyFrom(scalar_to_wire(value))  # type: ignore[index]


def config_from_wire(source: Mapping[str, pb.Scalar]) -> Config:
    if len(source) > MAX_CONFIG_ENTRIES:
        raise ProtocolError(f"{len(source)} config entries (limit {MAX_CONFIG_ENTRIES})")
    return {key: scalar_from_wire(value) for key, value in source.items()}


def kind_from_wire(kind: int) -> InstructionKind:
    try:
        return KIND_FROM_WIRE[kind]
    except KeyError:
        raise ProtocolError(f"unknown instruction kind {kind}") from None


def payload_messages(arrays: Arrays) -> tuple[pb.Payload, list[bytes]]:
    """Header and chunk bytes for `arrays`."""
    header, views = encode(arrays)
    return header, list(chunks(views))
