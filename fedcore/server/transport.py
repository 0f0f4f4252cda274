"""The gRPC transport, server side: one long-lived Session stream per connected site.

A site dials out and says Hello; the server names it (by its certificate under mutual TLS),
welcomes it with the run's task, then pushes instructions the moment the Coordinator has
them. Replies come back as a Result header plus payload chunks and resolve the request's
future. A site whose stream ends or whose heartbeats stop is gone: its pending requests
fail with SiteUnavailable, which the round treats as a dropout.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import weakref
from collections.abc import Callable
from functools import partial

import grpc

from fedcore.audit import AuditKind, AuditLog
from fedcore.engine import Instruction, Reply, Transport
from fedcore.errors import ProtocolError, SiteUnavailable
from fedcore.proto.v1 import federation_pb2 as pb
from fedcore.server.inbound import InboundLimits, read_site
from fedcore.server.limits import UploadBudget
from fedcore.server.revocation import RevocationList, certificate_serial
from fedcore.server.sessions import EncodedModel, Outgoing, Pending, SiteSession, instruction_message
from fedcore.server.site_text import clean_text, site_identity
from fedcore.tasks import TaskSpec
from fedcore.wire import (
    PROTOCOL_VERSION,
    SERVER_CHUNK_FIELD,
    SERVICE,
    chunk_frame,
    config_to_wire,
    parse,
    payload_messages,
)

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0
DOWNLOAD_FRAMES = 64  # x 256 KiB: 16 MiB of the model in gRPC's hands at once, for all sites


class GrpcTransport(Transport):
    """Both the Coordinator's Transport and the gRPC service sites connect to. Messages
    cross the handler as bytes: a round's model is serialized once for all sites."""

    def __init__(
        self,
        *,
        spec: TaskSpec,
        run_id: str,
        max_payload_bytes: int,
        max_tensors: int = 1 << 16,  # the model's tensors and one: no reply needs more
        heartbeat_timeout: float = 30.0,
        mutual_tls: bool = True,
        audit: AuditLog | None = None,
        revocations: RevocationList | None = None,
        allowed_sites: frozenset[str] | None = None,
        upload_budget: int,
    ) -> None:
        """`audit`: where every connection accepted or refused, and why, is recorded.
        `revocations`: the CRL checked when a stream opens (see `apply_revocations`).
        `allowed_sites`: the only site names that may join (None: any the CA certified).
        `upload_budget`: bytes of payloads assembled at once (`ServerLimits.budget_for`)."""
        self.limits = InboundLimits(
            max_payload_bytes,
            max_tensors,
            UploadBudget(upload_budget),
            heartbeat_timeout,
        )
        self.spec = spec
        self.allowed_sites = allowed_sites
        # Told a refused connection's status (e.g. for metrics).
        self.on_refused: Callable[[str], None] | None = None
        self.run_id = run_id
        self.heartbeat_timeout = heartbeat_timeout
        self._sending = asyncio.Semaphore(DOWNLOAD_FRAMES)  # payload frames in write at once
        self.mutual_tls = mutual_tls
        self._sessions: dict[str, SiteSession] = {}
        self._changed = asyncio.Condition()
        self._ids = itertools.count(1)
        self._finished: pb.RunEnd | None = None
        self._encoded: weakref.ref[EncodedModel] | None = None
        self._declines: dict[str, str] = {}  # since the coordinator last asked
        self._excluded: dict[str, str] = {}  # misbehaved: refused for the rest of the run
        self.audit = audit
        self.revocations = revocations

    def handler(self) -> grpc.GenericRpcHandler:
        """The Federation service, taking and giving serialized messages."""
        session = grpc.stream_stream_rpc_method_handler(self.Session)
        return grpc.method_handlers_generic_handler(SERVICE, {"Session": session})

    # ----- Transport -----

    async def wait_for_sites(self, count: int) -> None:
        async with self._changed:
            if len(self._sessions) < count:
                log.info("waiting for %d sites (%d connected)", count, len(self._sessions))
            await self._changed.wait_for(lambda: len(self._sessions) >= count)

    def available(self) -> list[str]:
        return list(self._sessions)

    def session_peers(self) -> set[str]:
        """The live sessions' peers; safe from any thread."""
        return {s.peer for s in list(self._sessions.values())}

    def sessions_seen(self) -> dict[str, float]:
        """Each connected site's last message, wall-clock (time.time); safe from any thread."""
        lag = time.time() - time.monotonic()
        return {name: s.last_seen + lag for name, s in list(self._sessions.items())}

    def _declined(self, site: str, reason: str) -> None:
        log.warning("site %s declined the job: %s", site, reason)
        if self.audit is not None:
            self.audit.append(AuditKind.JOB_DECLINED, site=site, reason=reason)
        self._declines[site] = reason

    def declined(self) -> dict[str, str]:
        declines, self._declines = self._declines, {}
        return declines

    def _payload(self, instruction: Instruction) -> EncodedModel:
        # Every site gets the same global model in a round: cut it once, and let it go once
        # every site has it.
        encoded = self._encoded() if self._encoded is not None else None
        if encoded is None or encoded.source is not instruction.parameters:
            encoded = EncodedModel(instruction.parameters, *payload_messages(instruction.parameters))
            self._encoded = weakref.ref(encoded)
        return encoded

    async def request(self, site: str, instruction: Instruction) -> Reply:
        session = self._sessions.get(site)
        if session is None:
            raise SiteUnavailable(site, "not connected")
        request_id = next(self._ids)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        try:
            session.pending[request_id] = Pending(future, instruction)
            encoded = self._payload(instruction)
            head = instruction_message(request_id, instruction, encoded.header)
            payload = encoded if encoded.pieces else None
            if payload and session.queued_payloads:  # one model waits unsent already, another is in write
                why = "it does not read its stream (a model is still queued for it)"
                self._disconnect(session, why, grpc.StatusCode.UNAVAILABLE)
                return await future  # failed with every request pending for it
            session.queued_payloads += payload is not None
            session.outbound.put_nowait(Outgoing(head, payload, request_id))
            del encoded, payload  # held by the queue only
            return await future
        finally:
            session.pending.pop(request_id, None)

    async def finish(self, *, completed: bool, reason: str) -> None:
        self._finished = pb.RunEnd(completed=completed, reason=reason)
        sessions = list(self._sessions.values())
        for session in sessions:
            self._end(session)
        if sessions:
            # Give the sites a moment to read RunEnd; their streams close on their side.
            waiters = [asyncio.ensure_future(s.closed.wait()) for s in sessions]
            await asyncio.wait(waiters, timeout=5.0)
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    def _end(self, session: SiteSession) -> None:
        assert self._finished is not None
        session.outbound.put_nowait(Outgoing(pb.ServerMessage(run_end=self._finished).SerializeToString()))
        session.outbound.put_nowait(None)

    def apply_revocations(self, *, force: bool = False) -> None:
        """Re-read the CRL if it changed; disconnect every live site it now revokes (its
        pending requests fail: the round drops it) and record each revocation."""
        if self.revocations is None:
            return
        new = self.revocations.refresh(force=force)
        if not new:
            return
        log.warning("revocation list updated: %d newly revoked certificates", len(new))
        live = {s.serial: s for s in self._sessions.values()}
        for serial in sorted(new):
            session = live.get(serial)
            if self.audit is not None:  # the site's name when it is connected (else its serial only)
                self.audit.append(
                    AuditKind.REVOKED,
                    serial=f"{serial:x}",
                    site=session.name if session else "",
                    connected=bool(session),
                )
            if session is not None:
                self._disconnect(session, "certificate revoked")

    def exclude(self, site: str, reason: str) -> None:
        self._excluded[site] = reason
        if self.audit is not None:
            self.audit.append(AuditKind.EXCLUDED, site=site, reason=reason)
        if (session := self._sessions.get(site)) is not None:
            self._disconnect(session, f"excluded from this run: {reason}")

    def _disconnect(
        self, session: SiteSession, why: str, code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED
    ) -> None:
        """End a live session now: its pending requests fail (the round drops it). `code`:
        PERMISSION_DENIED (revoked, excluded: the site stops), UNAVAILABLE (it may come back)."""
        log.warning("site %s: %s; disconnecting it", session.name, why)
        session.ended, session.end_code = why, code
        session.fail_pending(why)
        for task in session.tasks:
            task.cancel()

    async def watch_revocations(self, interval: float = 1.0) -> None:
        """Poll the CRL file: a `pki revoke` takes effect within `interval` seconds."""
        while True:
            await asyncio.sleep(interval)
            self.apply_revocations()

    # ----- servicer -----

    def _alive(self, name: str) -> bool:
        """One live session per identity: a second is refused, never evicts the first."""
        previous = self._sessions.get(name)
        return previous is not None and time.monotonic() - previous.last_seen <= self.heartbeat_timeout

    async def _refuse_duplicate(self, context: grpc.aio.ServicerContext, name: str, peer: str) -> None:
        log.error("site %s connected again from %s while its session is alive: refused", name, peer)
        why = f"site {name} already has a live session (the same identity in two places?)"
        await self._refuse(context, grpc.StatusCode.ALREADY_EXISTS, why, name)

    async def _refuse(
        self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, why: str, site: str = ""
    ) -> None:
        if self.audit is not None:
            self.audit.append(AuditKind.CONNECTION_REFUSED, site=site, peer=context.peer(), reason=why)
        if self.on_refused is not None:
            self.on_refused(code.name.lower())
        await context.abort(code, why)

    async def Session(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        peer = context.peer()
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                raw = await context.read()
            first = None if raw is grpc.aio.EOF else parse(pb.SiteMessage, raw)
        except TimeoutError:
            await self._refuse(context, grpc.StatusCode.DEADLINE_EXCEEDED, "no Hello received")
        except ProtocolError as err:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if first is None or first.WhichOneof("body") != "hello":
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "the first message must be Hello")
        assert first is not None  # abort() raised otherwise
        hello = first.hello
        try:
            name = site_identity(hello, context.auth_context() if self.mutual_tls else None)
        except ProtocolError as err:
            await self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, str(err))
        serial = None
        if self.mutual_tls and self.revocations is not None:
            serial = certificate_serial(bytes(context.auth_context()["x509_pem_cert"][0]))
            if serial in self.revocations.revoked:
                await self._refuse(
                    context, grpc.StatusCode.UNAUTHENTICATED, f"certificate {serial:x} is revoked", name
                )
        if name in self._excluded:
            why = f"excluded from this run: {self._excluded[name]}"
            await self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, why, name)
        if self.allowed_sites is not None and name not in self.allowed_sites:
            why = "not among this run's allowed sites ([federation] allowed_sites)"
            await self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, why, name)
        if hello.protocol_version != PROTOCOL_VERSION:
            await self._refuse(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {hello.protocol_version} unsupported; the server speaks {PROTOCOL_VERSION}",
                name,
            )
        if self._finished is not None:
            await context.write(pb.ServerMessage(run_end=self._finished).SerializeToString())
            return
        if hello.task != self.spec.name:
            await self._refuse(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this run trains task {self.spec.name!r}; the site offered {hello.task!r}",
                name,
            )
        if self._alive(name):  # before the Welcome, so that a refused copy backs off
            await self._refuse_duplicate(context, name, peer)
        welcome = pb.Welcome(run_id=self.run_id, site_name=name, task=self.spec.name)
        config_to_wire(welcome.task_config, self.spec.as_config())
        welcome.task_identity.package = self.spec.package
        welcome.task_identity.version = self.spec.version
        welcome.task_identity.code_hash = self.spec.code_hash
        await context.write(pb.ServerMessage(welcome=welcome).SerializeToString())

        session = SiteSession(name, serial=serial, peer=peer)
        async with self._changed:
            previous = self._sessions.get(name)
            duplicate = self._alive(name)  # again: two Hellos may have raced to here
            if not duplicate:
                if previous is not None:  # a reconnect: the old stream went silent
                    del self._sessions[name]
                    previous.fail_pending("reconnected")
                    for task in previous.tasks:
                        task.cancel()
                self._sessions[name] = session
                self._changed.notify_all()
        if duplicate:
            await self._refuse_duplicate(context, name, peer)
        if self._finished is not None:  # the run ended while this site was saying hello
            self._end(session)
        log.info("site %s connected from %s (%d connected)", name, peer, len(self._sessions))
        if self.audit is not None:
            self.audit.append(AuditKind.CONNECTION_ACCEPTED, site=name, peer=peer, run=self.run_id)
        session.tasks = tasks = [
            asyncio.ensure_future(
                read_site(session, context, self.limits, partial(self._declined, session.name))
            ),
            asyncio.ensure_future(self._write(session, context)),
            asyncio.ensure_future(self._watch(session)),
        ]
        if self.revocations is not None and serial in self.revocations.revoked:  # revoked meanwhile
            self._disconnect(session, "certificate revoked")
        reason = "stream ended"
        violation: ProtocolError | None = None
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and (error := task.exception()) is not None:
                    reason = clean_text(f"{type(error).__name__}: {error}")  # may quote the site
                    violation = error if isinstance(error, ProtocolError) else violation
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            async with self._changed:
                if self._sessions.get(name) is session:
                    del self._sessions[name]
                self._changed.notify_all()
            reason = session.ended or reason
            session.fail_pending(reason)
            session.closed.set()
            log.info("site %s disconnected: %s (%d connected)", name, reason, len(self._sessions))
        if session.ended is not None:
            await context.abort(session.end_code, session.ended)
        if violation is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, clean_text(str(violation)))

    async def _write(self, session: SiteSession, context: grpc.aio.ServicerContext) -> None:
        while (item := await session.outbound.get()) is not None:
            session.queued_payloads -= item.payload is not None
            await self._send(session, context, item)
            del item  # not held while the next is awaited: a model's pieces go once all have them

    async def _send(self, session: SiteSession, context: grpc.aio.ServicerContext, item: Outgoing) -> None:
        if item.request_id is not None and item.request_id not in session.pending:
            return  # the round gave up on it before it was sent: the site never sees it
        await context.write(item.head)
        for piece in item.payload.pieces if item.payload is not None else ():
            # A write ends once HTTP/2 flow control lets the chunk go: until then its frame
            # (and gRPC's copy) is held. At most DOWNLOAD_FRAMES are, whatever the number of
            # sites (1,000 sites had held one each: 250 MiB); a site that takes no chunk for
            # the heartbeat timeout gives its place up and is gone.
            async with self._sending:
                try:
                    async with asyncio.timeout(self.heartbeat_timeout):
                        await context.write(chunk_frame(SERVER_CHUNK_FIELD, piece))
                except TimeoutError:
                    why = f"it took no payload chunk for {self.heartbeat_timeout:.0f} s"
                    raise SiteUnavailable(session.name, why) from None

    async def _watch(self, session: SiteSession) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_timeout / 3)
            now, limit = time.monotonic(), self.heartbeat_timeout
            if now - session.last_seen > limit and not session.upload_waiting:
                raise SiteUnavailable(session.name, f"no heartbeat for {limit:.0f} s")
            if session.upload_held and now > session.upload_deadline:  # it holds others' turn
                raise SiteUnavailable(session.name, "its upload stalled (slower than 256 KiB/s)")
