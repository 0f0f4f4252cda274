"""What one connected site sends the server: heartbeats, declines, and results whose payload
follows in chunks. Every limit is checked before anything is allocated: the payload's size
and tensor count, its header against the request it answers, the site's message rate, and
its turn in the server's upload budget (so partial payloads never exceed the budget,
whatever the number of sites)."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from fedcore.errors import ProtocolError
from fedcore.proto.v1 import federation_pb2 as pb
from fedcore.server.limits import UploadBudget
from fedcore.server.sessions import MIN_CHUNK, SiteSession
from fedcore.server.site_text import clean_text
from fedcore.tensors import PayloadAssembler
from fedcore.wire import SITE_CHUNK_FIELD, chunk_data, parse

log = logging.getLogger(__name__)


# An upload that holds a turn in the budget must keep at least this pace (2 Mbit/s), after a
# grace of the heartbeat timeout: a site dripping a chunk now and then cannot keep the turn.
MIN_UPLOAD_RATE = 256 << 10  # bytes a second


@dataclass(frozen=True)
class InboundLimits:
    max_payload_bytes: int
    max_tensors: int
    uploads: UploadBudget
    grace: float = 30.0  # seconds (the heartbeat timeout)


async def take_turn(session: SiteSession, limits: InboundLimits, request_id: int, size: int) -> bool:
    """Wait in line for `size` bytes of the upload budget; False if the request expired while
    waiting (the payload is then skipped, never stored). Waiting is not silence: a site in
    line is not reading its stream, so its heartbeats are not seen (`upload_waiting`)."""
    turn = asyncio.ensure_future(limits.uploads.acquire(size))
    session.upload_waiting = True
    try:
        while not turn.done():
            await asyncio.wait({turn}, timeout=1.0)
            if not turn.done() and request_id not in session.pending:
                turn.cancel()  # gives the turn back if it was granted meanwhile
                await asyncio.gather(turn, return_exceptions=True)
                return False
    finally:
        session.upload_waiting = False
        if not turn.done():  # this reader was cancelled (the session ends)
            turn.cancel()
    turn.result()
    session.upload_held = size
    session.upload_deadline = time.monotonic() + limits.grace + size / MIN_UPLOAD_RATE
    return True


def _give_back(loop: asyncio.AbstractEventLoop, budget: UploadBudget, size: int) -> None:
    """A reply's turn, once the round is done with it (whichever thread dropped it last)."""
    if not loop.is_closed():
        loop.call_soon_threadsafe(budget.release, size)


async def read_site(
    session: SiteSession,
    context: grpc.aio.ServicerContext,
    limits: InboundLimits,
    on_decline: Callable[[str], None],
) -> None:
    """Read the site's stream until it ends (or it declines the job: `on_decline(reason)`);
    ProtocolError when it breaks the protocol. Its upload turn is given back however it ends."""
    try:
        await _read(session, context, limits, on_decline)
    finally:
        limits.uploads.release(session.upload_held)
        session.upload_held = 0


async def _read(
    session: SiteSession,
    context: grpc.aio.ServicerContext,
    limits: InboundLimits,
    on_decline: Callable[[str], None],
) -> None:
    assembling: tuple[pb.Result, PayloadAssembler] | None = None

    def add(data: bytes | memoryview) -> None:
        nonlocal assembling
        if assembling is None:
            raise ProtocolError("payload chunk without a Result header")
        assembling[1].add(data)
        if session.upload_held and assembling[0].request_id not in session.pending:
            assembling[1].skip()  # the round gave up on it: store no more, and free its turn
            limits.uploads.release(session.upload_held)
            session.upload_held = 0
        if assembling[1].complete:
            held, session.upload_held = session.upload_held, 0
            try:
                reply = session.resolve(*assembling)
            except BaseException:  # a reply that breaks the protocol: its turn ends with it
                limits.uploads.release(held)
                raise
            assembling = None
            if reply is None or not held:  # not wanted any more (or nothing held): freed now
                limits.uploads.release(held)
            else:  # a reply waiting to be folded is in the budget too: its turn ends with it
                weakref.finalize(reply, _give_back, asyncio.get_running_loop(), limits.uploads, held)

    while (raw := await context.read()) is not grpc.aio.EOF:
        session.last_seen = time.monotonic()
        data = chunk_data(SITE_CHUNK_FIELD, raw)
        if data is not None:
            if assembling is not None and len(data) < min(MIN_CHUNK, assembling[1].remaining):
                raise ProtocolError(f"a payload chunk of {len(data)} bytes before the payload's last")
            add(data)  # no floods of tiny chunks, above
            continue
        if not session.messages.allow():
            raise ProtocolError(f"more than {session.messages.rate:.0f} messages a second")
        message = parse(pb.SiteMessage, raw)
        body = message.WhichOneof("body")
        if body == "heartbeat":
            continue
        if body == "decline":  # the site's policy refuses this job: recorded, and it leaves
            if session.answered:
                raise ProtocolError("a site that took part in the job cannot decline it")
            on_decline(clean_text(message.decline.reason.strip()) or "no reason given")
            return
        if body == "chunk":
            add(message.chunk.data)
        elif body == "result":
            session.answered = True
            if assembling is not None:
                raise ProtocolError("a new Result began before the previous payload was complete")
            result = message.result
            size, tensors = result.payload.total_bytes, len(result.payload.tensors)
            if size > limits.max_payload_bytes or tensors > limits.max_tensors:
                raise ProtocolError(
                    f"a payload of {size} bytes in {tensors} tensors exceeds the limit "
                    f"({limits.max_payload_bytes} bytes, {limits.max_tensors} tensors)"
                )
            live = session.check_header(result)  # before anything is allocated
            if live and size:  # wait for its turn in the upload budget before reading a byte
                live = await take_turn(session, limits, result.request_id, size)
            assembling = (result, PayloadAssembler(result.payload, keep=live))
            if assembling[1].complete:  # nothing follows
                add(b"")
        else:
            raise ProtocolError(f"unexpected {body!r} message from a connected site")
