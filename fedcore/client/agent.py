"""`fedcore client`: the site agent. Dials out to the server (a site accepts no inbound
connection), holds one Session stream with heartbeats, trains what the server asks on the
site's own data, and reconnects with exponential backoff when the connection drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from fedcore.aggregation import SiteStages
from fedcore.aggregation import wire as stage_wire
from fedcore.client.site_audit import SiteAudit
from fedcore.client.task_policy import Approval, JobCode, refusal
from fedcore.engine import Instruction, InstructionKind, Reply, Site
from fedcore.errors import FedcoreError, ProtocolError
from fedcore.pki import TlsFiles
from fedcore.privacy.site_policy import SitePrivacy
from fedcore.proto.v1 import federation_pb2 as pb
from fedcore.secagg.identity import Identity, certificate_identity
from fedcore.tasks import Task, task_source
from fedcore.tasks.base import job_from_config
from fedcore.tasks.plugins import TaskSource
from fedcore.tensors import PayloadAssembler, check_header_like
from fedcore.wire import (
    KIND_TO_WIRE,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    REFUSAL_TO_WIRE,
    SERVER_CHUNK_FIELD,
    SESSION_METHOD,
    SITE_CHUNK_FIELD,
    chunk_data,
    chunk_frame,
    config_from_wire,
    config_to_wire,
    kind_from_wire,
    parse,
    payload_messages,
)

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class Outcome(enum.Enum):
    COMPLETED = "completed"  # the server finished the run
    STOPPED = "stopped"  # the server ended the run early
    GAVE_UP = "gave up"  # no server for longer than `give_up_after`
    REJECTED = "rejected"  # the server refused this site (wrong task, protocol, identity)
    BAD_DATA = "bad data"  # the site's data does not fit the job's schema (SiteAgent.problem says how)


@dataclass
class AgentSettings:
    server: str
    task_name: str
    data_uri: str
    tls: TlsFiles | None  # None: plaintext (--insecure)
    site_name: str = ""  # only sent on insecure connections
    heartbeat_interval: float = 5.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    give_up_after: float = 600.0  # seconds without a working connection
    approved_tasks: list[Approval] | None = None  # site.toml [policy] tasks; None: no policy
    data_settings: dict[str, Any] = field(default_factory=dict)  # how the site's file maps to the job (label)
    audit: Path | None = None  # the site's tamper-evident log of jobs and rounds (None: none)


class _Rejected(FedcoreError):
    pass


class _BadData(FedcoreError):
    pass


class SiteAgent:
    def __init__(self, settings: AgentSettings, task: Task, privacy: SitePrivacy | None = None) -> None:
        self.settings = settings
        self.task = task
        self.privacy = privacy or SitePrivacy()  # one ledger for every run this process serves
        self.site: Site | None = None
        self._site_key: tuple[object, ...] | None = None
        self.run_end: pb.RunEnd | None = None
        self._last_contact = time.monotonic()
        self._inflight: asyncio.Future[Reply] | None = None
        self._code: TaskSource | None = None  # the task's package, version and code hash
        self.problem = ""  # why the site stopped with Outcome.BAD_DATA
        self.run_id = ""
        self.audit: SiteAudit | None = None
        if settings.audit is not None:
            self.audit = SiteAudit(settings.audit, key_pem=settings.tls.key if settings.tls else None)

    def _channel(self) -> grpc.aio.Channel:
        s = self.settings
        if s.tls is None:
            return grpc.aio.insecure_channel(s.server, options=CHANNEL_OPTIONS)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=s.tls.ca, private_key=s.tls.key, certificate_chain=s.tls.certificate
        )
        return grpc.aio.secure_channel(s.server, credentials, options=CHANNEL_OPTIONS)

    async def run(self) -> Outcome:
        """Connect, serve the run, reconnect on failure; return how the run ended for us."""
        s = self.settings
        gc.freeze()  # start-up objects live for the whole run: keep them out of every GC pass
        delay = s.backoff_initial
        self._last_contact = time.monotonic()
        while True:
            try:
                async with self._channel() as channel:
                    await self._session(channel)
                if self.run_end is not None:
                    return Outcome.COMPLETED if self.run_end.completed else Outcome.STOPPED
            except _Rejected as err:
                log.error("the server refused this site: %s", err)
                return Outcome.REJECTED
            except _BadData as err:
                self.problem = str(err)
                return Outcome.BAD_DATA
            except ProtocolError as err:
                log.warning("the server broke the protocol: %s", err)
            except grpc.aio.AioRpcError as err:
                if err.code() in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,  # revoked, or excluded from the run
                    grpc.StatusCode.FAILED_PRECONDITION,
                ):
                    log.error("the server refused this site: %s", err.details())
                    return Outcome.REJECTED
                log.warning("connection to %s failed: %s %s", s.server, err.code().name, err.details())
            except Exception:  # a bug or a resource error: log it, reconnect, keep the site up
                log.exception("site agent error")
            if time.monotonic() - self._last_contact < 2 * s.heartbeat_interval:
                delay = s.backoff_initial  # we were connected until a moment ago
            if time.monotonic() - self._last_contact > s.give_up_after:
                log.error("no server at %s for %.0f s; giving up", s.server, s.give_up_after)
                return Outcome.GAVE_UP
            pause = delay * random.uniform(0.5, 1.0)
            log.info("reconnecting in %.1f s", pause)
            await asyncio.sleep(pause)
            delay = min(delay * 2, s.backoff_max)

    async def _session(self, channel: grpc.aio.Channel) -> bool:
        """One stream from Hello to its end; True once the server welcomed us."""
        # Messages cross the call as bytes: payload chunks are framed by fedcore.wire.
        call = channel.stream_stream(SESSION_METHOD)()
        hello = pb.Hello(protocol_version=PROTOCOL_VERSION, task=self.settings.task_name)
        if self.settings.tls is None:
            hello.site_name = self.settings.site_name
        await call.write(pb.SiteMessage(hello=hello).SerializeToString())
        raw = await call.read()
        if raw is grpc.aio.EOF:
            await call.wait_for_connection()
            raise ProtocolError("the server closed the stream before welcoming us")
        first = parse(pb.ServerMessage, raw)
        if first.WhichOneof("body") == "run_end":
            self.run_end = first.run_end
            return True
        if first.WhichOneof("body") != "welcome":
            raise ProtocolError("the server's first message was not a Welcome")
        self._last_contact = time.monotonic()
        if (why := self._declines(first.welcome)) is not None:
            if self.audit is not None:
                self.audit.declined(first.welcome.run_id, why)
            await call.write(pb.SiteMessage(decline=pb.Decline(reason=why)).SerializeToString())
            await call.done_writing()
            with contextlib.suppress(Exception):  # until the server has read it and closed
                async with asyncio.timeout(5):
                    while await call.read() is not grpc.aio.EOF:
                        pass
            raise _Rejected(f"declined the job: {why}")
        self._prepare(first.welcome)
        log.info("connected to %s as %s", self.settings.server, first.welcome.site_name)
        outbound: asyncio.Queue[bytes] = asyncio.Queue(64)
        work: asyncio.Queue[tuple[int, Instruction] | None] = asyncio.Queue(4)
        tasks = [
            asyncio.ensure_future(self._read(call, work)),
            asyncio.ensure_future(self._work(work, outbound)),
            asyncio.ensure_future(self._write(call, outbound)),
            asyncio.ensure_future(self._heartbeat(outbound)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and (err := task.exception()) is not None and self.run_end is None:
                    raise err
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            call.cancel()
        return True

    def _declines(self, welcome: pb.Welcome) -> str | None:
        """Why this site will not run the job (its policy on task code), or None."""
        if welcome.task != self.settings.task_name:
            return None  # refused below, without a word to the server
        identity = welcome.task_identity
        job = JobCode(identity.package, identity.version, identity.code_hash)
        if self._code is None:  # once: the code this process loaded, not what is on disk later
            self._code = task_source(self.settings.task_name)
        return refusal(self.settings.approved_tasks, self._code, job)

    def _prepare(self, welcome: pb.Welcome) -> None:
        """Load the site's data the way the run says (once per distinct run setup)."""
        if welcome.task != self.settings.task_name:
            raise _Rejected(
                f"the server runs task {welcome.task!r}, this site has {self.settings.task_name!r}"
            )
        config = config_from_wire(welcome.task_config)
        # A new run gets a fresh site (its stages' state, its last contribution); the same
        # run after the server restarted keeps it, so a redone round is not charged twice.
        key = (welcome.run_id, welcome.task, *sorted(config.items()))
        if self.site is not None and key == self._site_key:
            return
        try:  # the job's task settings first (where the model comes from, the data schema)
            job = {**job_from_config(config), **self.settings.data_settings}
            if "model" in job:  # the job's model, which the server's updates are shaped for
                self.task.use_model(str(job["model"]))
            self.task.configure(job)
        except (KeyError, ValueError, TypeError) as err:
            raise _Rejected(f"cannot set up task {welcome.task!r} for this run: {err}") from None
        try:  # the site's own data, against the job's schema: a mismatch sends nothing
            data = self.task.site_data(
                self.settings.data_uri,
                partition=str(config["partition"]),
                seed=int(config["seed"]),
                partitions=int(config["partitions"]),
            )
        except (KeyError, ValueError, OSError) as err:
            where = self.settings.data_uri
            raise _BadData(str(err) if where in str(err) else f"data {where}: {err}") from None
        try:  # the model's template, from the configured task
            stages = SiteStages(welcome.site_name, self.privacy, identity=self._identity())
            self.site = Site(name=welcome.site_name, task=self.task, data=data, stages=stages)
        except ValueError as err:
            raise _Rejected(f"cannot set up task {welcome.task!r} for this run: {err}") from None
        self._site_key = key
        self.run_id = welcome.run_id
        log.info("loaded %d training examples from %s", len(data.train), self.settings.data_uri)
        if self.audit is not None:
            self.audit.accepted(welcome, self.settings.server)

    def _identity(self) -> Identity | None:
        """The site's certificate key signs its secure-aggregation messages; without a kit
        (--insecure) there is nothing to sign with, and only an honest server is kept out."""
        tls = self.settings.tls
        return certificate_identity(tls.key, tls.certificate, tls.ca) if tls is not None else None

    async def _read(
        self, call: grpc.aio.StreamStreamCall, work: asyncio.Queue[tuple[int, Instruction] | None]
    ) -> None:
        current: tuple[pb.Instruction, PayloadAssembler] | None = None
        while (raw := await call.read()) is not grpc.aio.EOF:
            self._last_contact = time.monotonic()
            data = chunk_data(SERVER_CHUNK_FIELD, raw)
            if data is not None:
                if current is None:
                    raise ProtocolError("payload chunk without an instruction")
                current[1].add(data)
            else:
                message = parse(pb.ServerMessage, raw)
                body = message.WhichOneof("body")
                if body == "run_end":
                    self.run_end = message.run_end
                    log.info("run ended: %s", message.run_end.reason)
                    await work.put(None)
                    return
                if body == "instruction":
                    if current is not None:
                        raise ProtocolError("instruction began before the previous payload was complete")
                    assert self.site is not None
                    # Checked against the model before any allocation: a server cannot make
                    # this site reserve memory for a payload the model does not have.
                    # (A secure-aggregation stage other than the masked input carries no model.)
                    modelless = kind_from_wire(message.instruction.kind) in (
                        InstructionKind.STAGE,
                        InstructionKind.STATISTICS,
                    )
                    check_header_like(message.instruction.payload, {} if modelless else self.site.template)
                    current = (message.instruction, PayloadAssembler(message.instruction.payload))
                elif body == "chunk" and current is not None:
                    current[1].add(message.chunk.data)
                else:
                    raise ProtocolError(f"unexpected {body!r} message from the server")
            if current is not None and current[1].complete:
                ins, assembler = current
                assert self.site is not None
                stage_message = (
                    stage_wire.message_from_wire(ins.secagg, site=self.site.name)
                    if ins.HasField("secagg")
                    else None
                )
                instruction = Instruction(
                    kind=kind_from_wire(ins.kind),
                    round=ins.round,
                    parameters=assembler.arrays(),
                    config=config_from_wire(ins.config),
                    attempt=max(ins.attempt, 1),
                    message=stage_message,
                    plan=stage_wire.plan_from_wire(ins.plan),
                    exchange=ins.exchange,
                )
                await work.put((ins.request_id, instruction))
                current = None

    async def _work(
        self,
        work: asyncio.Queue[tuple[int, Instruction] | None],
        outbound: asyncio.Queue[bytes],
    ) -> None:
        assert self.site is not None
        while (item := await work.get()) is not None:
            request_id, instruction = item
            if self._inflight is not None and not self._inflight.done():
                # Training from a lost connection is still running in its thread: never
                # train twice at once (CPU, GPU memory, and later the privacy budget).
                await asyncio.wait([self._inflight])
            started = time.perf_counter()
            log.info("round %d %s started", instruction.round, instruction.kind.value)
            self._inflight = asyncio.get_running_loop().run_in_executor(None, self.site.handle, instruction)
            reply = await asyncio.shield(self._inflight)
            log.info(
                "round %d %s done in %.2f s%s",
                instruction.round,
                instruction.kind.value,
                time.perf_counter() - started,
                f" (refused: {reply.refusal})" if reply.refusal else "",
            )
            if self.audit is not None:
                self.audit.handled(self.run_id, instruction, reply)
            for message in reply_messages(reply, request_id):
                await outbound.put(message)

    async def _write(self, call: grpc.aio.StreamStreamCall, outbound: asyncio.Queue[bytes]) -> None:
        while True:
            await call.write(await outbound.get())

    async def _heartbeat(self, outbound: asyncio.Queue[bytes]) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            await outbound.put(pb.SiteMessage(heartbeat=pb.Heartbeat()).SerializeToString())


def reply_messages(reply: Reply, request_id: int) -> list[bytes]:
    """The serialized Result header, then the frames of its payload."""
    result = pb.Result(
        request_id=request_id,
        round=reply.round,
        kind=KIND_TO_WIRE[reply.kind],
        num_examples=reply.num_examples,
        refusal=reply.refusal or "",
    )
    if reply.refusal is not None and reply.refusal_code is not None:
        result.refusal_code = REFUSAL_TO_WIRE[reply.refusal_code]
    config_to_wire(result.metrics, reply.metrics)
    pieces: list[bytes | memoryview] = []
    payload = reply.update
    if reply.message is not None and reply.refusal is None:
        result.secagg.CopyFrom(stage_wire.message_to_wire(reply.message))
        payload = stage_wire.message_payload(reply.message) or payload
    if payload is not None and reply.refusal is None:
        header, pieces = payload_messages(payload)
        result.payload.CopyFrom(header)
    return [
        pb.SiteMessage(result=result).SerializeToString(),
        *(chunk_frame(SITE_CHUNK_FIELD, p) for p in pieces),
    ]
