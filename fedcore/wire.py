"""Engine messages <-> protocol messages, shared by the server and the site agent.

Nothing here does I/O: a message becomes a list of protocol messages (header first, then
the payload's chunks) and back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from fedcore.aggregation import RefusalCode
from fedcore.engine.messages import Config, InstructionKind, Scalar
from fedcore.errors import ProtocolError
from fedcore.proto.v1 import federation_pb2 as pb
from fedcore.tensors import Arrays, chunks, encode

PROTOCOL_VERSION = 5  # 2: signed SecAgg+ keys and the consistency check; 3: seed commitments, share digests, the nonce reveal; 4: public DP-SGD sampling rate and steps; 5: distributed DP's modular, rotated sum
SERVICE = pb.DESCRIPTOR.services_by_name["Federation"].full_name
SESSION_METHOD = f"/{SERVICE}/Session"
MAX_MESSAGE_BYTES = 4 << 20  # every message is far smaller: payloads travel in 256 KiB chunks
MAX_CONFIG_ENTRIES = 256

M = TypeVar("M", bound=Message)

KIND_TO_WIRE = {
    InstructionKind.FIT: pb.INSTRUCTION_KIND_FIT,
    InstructionKind.EVALUATE: pb.INSTRUCTION_KIND_EVALUATE,
    InstructionKind.STAGE: pb.INSTRUCTION_KIND_STAGE,
    InstructionKind.STATISTICS: pb.INSTRUCTION_KIND_STATISTICS,
}
KIND_FROM_WIRE: dict[int, InstructionKind] = {v: k for k, v in KIND_TO_WIRE.items()}
REFUSAL_TO_WIRE = {
    RefusalCode.PRIVACY_BUDGET: pb.REFUSAL_CODE_PRIVACY_BUDGET,
    RefusalCode.BAD_INSTRUCTION: pb.REFUSAL_CODE_BAD_INSTRUCTION,
    RefusalCode.FAILED: pb.REFUSAL_CODE_FAILED,
    RefusalCode.ABORTED: pb.REFUSAL_CODE_ABORTED,
}
_REFUSAL_FROM_WIRE: dict[int, RefusalCode] = {int(v): k for k, v in REFUSAL_TO_WIRE.items()}


def refusal_from_wire(code: int) -> RefusalCode:
    """A refusal's code; one this side does not know (or none) reads as a failure."""
    return _REFUSAL_FROM_WIRE.get(code, RefusalCode.FAILED)


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


def parse(kind: type[M], raw: bytes) -> M:
    """A protobuf message from bytes; ProtocolError when they are not one."""
    try:
        return kind.FromString(raw)
    except DecodeError as err:
        raise ProtocolError(f"undecodable {kind.__name__}: {err}") from None


def kind_from_wire(kind: int) -> InstructionKind:
    try:
        return KIND_FROM_WIRE[kind]
    except KeyError:
        raise ProtocolError(f"unknown instruction kind {kind}") from None


def payload_messages(arrays: Arrays) -> tuple[pb.Payload, list[bytes | memoryview]]:
    """Header and chunk bytes for `arrays`."""
    header, views = encode(arrays)
    return header, list(chunks(views))


# Payload chunks are nearly all the bytes on the wire. Their frame, a message whose only set
# field is a Chunk (SiteMessage field 4, ServerMessage field 3), is written and read here
# directly: one copy from the arrays into the frame and none out of it, instead of protobuf's
# several. Everything else goes through protobuf. Tests pin the encoding to protobuf's.
SITE_CHUNK_FIELD = pb.SiteMessage.DESCRIPTOR.fields_by_name["chunk"].number
SERVER_CHUNK_FIELD = pb.ServerMessage.DESCRIPTOR.fields_by_name["chunk"].number
_DATA_TAG = (pb.Chunk.DESCRIPTOR.fields_by_name["data"].number << 3) | 2


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(raw) and shift < 64:
        byte = raw[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    return -1, pos


def chunk_frame(field: int, data: bytes | memoryview) -> bytes:
    """The serialized message {field: Chunk{data}}, byte for byte what protobuf writes."""
    inner = bytes([_DATA_TAG]) + _varint(len(data)) if len(data) else b""
    return b"".join((bytes([(field << 3) | 2]), _varint(len(inner) + len(data)), inner, data))


def chunk_data(field: int, raw: bytes) -> memoryview | None:
    """The data of a serialized {field: Chunk{data}} message, or None when `raw` is anything
    else (then parse it with protobuf)."""
    if len(raw) < 4 or raw[0] != (field << 3) | 2:
        return None
    outer, pos = _read_varint(raw, 1)
    if outer <= 0 or pos >= len(raw) or pos + outer != len(raw) or raw[pos] != _DATA_TAG:
        return None
    size, start = _read_varint(raw, pos + 1)
    if size < 0 or start + size != len(raw):
        return None
    return memoryview(raw)[start:]
