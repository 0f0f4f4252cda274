"""One connected site's session on the server: its queue of outgoing messages, the requests
awaiting its reply, and how a complete reply resolves one of them."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from fedcore.aggregation import wire as stage_wire
from fedcore.engine import Instruction, InstructionKind, Reply
from fedcore.errors import ProtocolError, SiteUnavailable
from fedcore.proto.v1 import federation_pb2 as pb
from fedcore.server.site_text import clean_metrics, clean_text
from fedcore.tensors import PayloadAssembler
from fedcore.tensors.codec import check_header_like
from fedcore.wire import KIND_TO_WIRE, config_from_wire, config_to_wire, kind_from_wire, refusal_from_wire

log = logging.getLogger(__name__)


@dataclass
class Pending:
    future: asyncio.Future[Reply]
    instruction: Instruction


@dataclass(eq=False)
class EncodedModel:
    """A model's payload header and chunk pieces (views into its arrays), made once for every
    site in a round; each chunk's frame is built as it is written, so the server never holds
    the model a second time. The transport keeps only a weak reference: it lives while some
    site's writer still has it to send."""

    source: object  # the model it was cut from
    header: pb.Payload
    pieces: list[bytes | memoryview]


@dataclass(frozen=True)
class Outgoing:
    """Serialized messages written back to back: a header and its whole payload, never part."""

    head: bytes
    payload: EncodedModel | None = None
    request_id: int | None = None  # skipped if that request was cancelled before its turn


MESSAGES_PER_SECOND, MESSAGE_BURST = 200.0, 1000.0  # a site's messages besides payload chunks
MIN_CHUNK = 1 << 16  # bytes: every chunk but a payload's last (sites send 256 KiB)


@dataclass
class RateLimit:
    """A token bucket: `burst` messages at once, `rate` a second after that. An honest site
    sends a heartbeat every 10 s and a few replies a round (fast rounds: tens a second); a flood
    of heartbeats or replies (the review's took 11.7 s of CPU in 12 s) ends its session."""

    rate: float = MESSAGES_PER_SECOND
    burst: float = MESSAGE_BURST
    tokens: float = MESSAGE_BURST
    stamp: float = field(default_factory=time.monotonic)

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass
class SiteSession:
    name: str
    # An item per instruction, its payload the round's `EncodedModel` (shared by all sites); a
    # site that does not read holds at most one model queued (`queued_payloads`) besides the
    # one in write: another, and it is disconnected.
    outbound: asyncio.Queue[Outgoing | None] = field(default_factory=asyncio.Queue)
    pending: dict[int, Pending] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    answered: bool = False  # it has sent a result: it took the job, and may no longer decline it
    serial: int | None = None  # of its certificate, under mutual TLS
    peer: str = ""  # its connection's address, as gRPC names it ("ipv4:10.0.0.7:52110")
    ended: str | None = None  # why the server ended it (revoked, excluded): said when closing
    end_code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED  # ... with this status
    unknown_replies: int = 0  # replies to requests it was not (or no longer) asked
    queued_payloads: int = 0  # items with a payload in `outbound`, not yet taken by the writer
    messages: RateLimit = field(default_factory=RateLimit)
    upload_held: int = 0  # bytes of the server's upload budget its payload in progress holds
    upload_deadline: float = 0.0  # when that payload must be complete (`inbound.MIN_UPLOAD_RATE`)
    upload_waiting: bool = False  # in line for the budget: not reading, so heartbeats unseen

    def fail_pending(self, reason: str) -> None:
        for item in self.pending.values():
            if not item.future.done():
                item.future.set_exception(SiteUnavailable(self.name, reason))
        self.pending.clear()

    def check_header(self, result: pb.Result) -> bool:
        """Before a byte of the payload is stored: whether the reply answers a live request
        (False: an unknown or expired one, whose chunks are skipped), and ProtocolError
        unless its header is what that request can be answered with. The check costs at
        most the model's tensor count: a header listing 100,000 tensors is refused at once."""
        pending = self.pending.get(result.request_id)
        if pending is None:
            self.unknown_replies += 1
            doubled = self.unknown_replies & (self.unknown_replies - 1) == 0  # 1, 2, 4, 8 ...
            if doubled:  # a flood is one line a doubling, not one a reply
                log.warning(
                    "site %s answered %d unknown or expired requests; ignored",
                    self.name,
                    self.unknown_replies,
                )
            return False
        check_payload_header(pending.instruction, result.payload)
        return True

    def resolve(self, result: pb.Result, assembler: PayloadAssembler) -> Reply | None:
        """Resolve the request this complete reply answers; the Reply, or None if the request
        expired (the reply is dropped)."""
        pending = self.pending.get(result.request_id)
        if pending is None:  # it expired while the payload arrived
            return None
        instruction = pending.instruction
        kind = kind_from_wire(result.kind)
        if result.round != instruction.round or kind is not instruction.kind:
            raise ProtocolError(
                f"reply for round {result.round} {kind.value} to a round {instruction.round} {instruction.kind.value}"
            )
        metrics = {k: v for k, v in config_from_wire(result.metrics).items() if isinstance(v, int | float)}
        metrics = clean_metrics(self.name, metrics)
        arrays = assembler.arrays() if assembler.header.tensors else None
        stage_message = None
        if result.HasField("secagg") and not result.refusal:
            # The sender is the authenticated session, whatever the message might claim.
            stage_message = stage_wire.message_from_wire(result.secagg, site=self.name, payload=arrays)
            arrays = None
        reply = Reply(
            message=stage_message,
            site=self.name,
            kind=kind,
            round=result.round,
            num_examples=result.num_examples,
            update=arrays,
            metrics={k: float(v) for k, v in metrics.items()},
            refusal=clean_text(result.refusal) if result.refusal else None,
            refusal_code=refusal_from_wire(result.refusal_code) if result.refusal else None,
        )
        if pending.future.done():
            return None
        pending.future.set_result(reply)
        return reply


def check_payload_header(instruction: Instruction, header: pb.Payload) -> None:
    """ProtocolError unless `header` announces what `instruction` can be answered with: a
    model-shaped update for a plain fit (names, dtypes and shapes exactly the model's), else
    at most one tensor per model tensor and one more (a masked vector, a statistics vector)."""
    if not header.tensors:
        return
    model = instruction.parameters
    if len(header.tensors) > len(model) + 1:
        raise ProtocolError(f"a payload of {len(header.tensors)} tensors answers a model of {len(model)}")
    if instruction.kind is InstructionKind.FIT and instruction.message is None and model:
        check_header_like(header, model)


def instruction_message(request_id: int, instruction: Instruction, header: pb.Payload) -> bytes:
    """The serialized ServerMessage that carries `instruction` (its payload's frames follow)."""
    message = pb.Instruction(
        request_id=request_id,
        round=instruction.round,
        kind=KIND_TO_WIRE[instruction.kind],
        payload=header,
        attempt=instruction.attempt,
        exchange=instruction.exchange,
    )
    config_to_wire(message.config, instruction.config)
    message.plan.extend(stage_wire.plan_to_wire(instruction.plan))
    if instruction.message is not None:
        message.secagg.CopyFrom(stage_wire.message_to_wire(instruction.message))
    return pb.ServerMessage(instruction=message).SerializeToString()
