"""`fedcore server`: the coordinator's process. Serves the Federation service and runs the
Coordinator's rounds over the gRPC transport. The run is durable in the state directory
(run.db; metrics.jsonl, sites.jsonl and model.safetensors are views of it): with
`resume`, a server killed at any point continues from its last completed round."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc

from fedcore import pki
from fedcore.audit import AuditKind, AuditLog, key_signer
from fedcore.config import Experiment
from fedcore.engine import Coordinator, RoundRecord, RunResult
from fedcore.engine.model_file import model_digest
from fedcore.engine.records import FanOutStore
from fedcore.engine.run_state import RunState
from fedcore.engine.runs import OpenedRun, open_run
from fedcore.seeding import derive_seed
from fedcore.server.address_cap import AddressCap
from fedcore.server.dashboard import Dashboard, serve_dashboard
from fedcore.server.limits import ServerLimits, cap_malloc_arenas, connection_cap, server_options
from fedcore.server.metrics import ServerMetrics, serve_metrics
from fedcore.server.revocation import RevocationList
from fedcore.server.transport import GrpcTransport
from fedcore.tasks import (
    Task,
    TaskSpec,
    default_partition,
    job_settings,
    task_for,
    task_source,
    with_task_defaults,
)
from fedcore.tracking import Tracker
from fedcore.wire import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)


# Sites ping every 10 s (see client.agent); allow it, and detect dead peers within ~30 s.
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Without BDP probing a stream's window stays small: gRPC would otherwise take a waiting
    # site's whole update into its own buffers (200 sites x 1M params: +860 MiB measured).
    ("grpc.http2.bdp_probe", 0),
]


MAX_STREAMS = 10_000


def task_spec(experiment: Experiment, task: Task) -> TaskSpec:
    code = task_source(experiment.task.name)
    return TaskSpec(
        name=experiment.task.name,
        model=task.model,
        partition=experiment.data.partition or default_partition(task),
        seed=experiment.seed,
        partitions=experiment.simulation.sites,
        package=code.package,
        version=code.version,
        code_hash=code.code_hash,
        job=job_settings(experiment, sites=True),
    )


async def serve(
    experiment: Experiment,
    *,
    listen: str,
    state: Path,
    pki_dir: Path | None,
    task: Task | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_listening: Callable[[int], None] | None = None,
    resume: bool = False,
    command: dict[str, Any] | None = None,
    trackers: Sequence[Tracker] = (),
    metrics: str | None = None,
    on_metrics: Callable[[int], None] | None = None,
    dashboard: str | None = None,
    on_dashboard: Callable[[int], None] | None = None,
    limits: ServerLimits | None = None,
) -> RunResult:
    """Run the federation until every round is done (or the task is cancelled). With
    `resume`, continue the run stored in `state` (ConfigError if the experiment differs);
    a run already complete returns at once. `command`: how the experiment was given.
    `metrics`: HOST:PORT (or PORT, on 127.0.0.1) to serve Prometheus metrics and /healthz on;
    `on_metrics` gets the port bound. `dashboard`, `on_dashboard`: the same for the live web
    dashboard (its URL, with its token, in STATE/dashboard.url). `limits`: connections,
    upload budget (`ServerLimits.budget_for`), heartbeat."""
    experiment = with_task_defaults(experiment)
    task = task or task_for(experiment)
    opened = open_run(state, experiment, resume=resume, command=command)  # before listening: the lock
    try:
        if opened.complete:
            log.info(
                "run %s is already complete (%d rounds); nothing to do", opened.run_id, len(opened.history)
            )
            initial = task.initial_parameters(derive_seed(experiment.seed, "init"))
            parameters = opened.state.parameters if opened.state else initial
            return RunResult(parameters, opened.history, opened.state.stopped if opened.state else None)
        if opened.state is not None:
            log.info("resuming run %s after round %d", opened.run_id, opened.state.round)
        for tracker in trackers:
            tracker.start(experiment, opened.run_id, opened.history)
        result: RunResult | None = None
        try:
            sign = key_signer(pki.server_files(pki_dir).key) if pki_dir is not None else None
            audit = AuditLog(state / "audit.log", sign=sign)  # connections, refusals, rounds
            result = await _serve(
                experiment,
                task,
                opened,
                listen,
                pki_dir,
                on_round,
                on_listening,
                trackers,
                audit,
                (metrics, on_metrics),
                (dashboard, on_dashboard),
                limits or ServerLimits(),
            )
        finally:
            for tracker in trackers:
                tracker.finish(result.parameters if result else None, completed=result is not None)
        opened.store.finish()
        return result
    finally:
        opened.close()


async def _serve(
    experiment: Experiment,
    task: Task,
    opened: OpenedRun,
    listen: str,
    pki_dir: Path | None,
    on_round: Callable[[RoundRecord], None] | None,
    on_listening: Callable[[int], None] | None,
    trackers: Sequence[Tracker],
    audit: AuditLog,
    metrics_at: tuple[str | None, Callable[[int], None] | None],
    dashboard_at: tuple[str | None, Callable[[int], None] | None],
    limits: ServerLimits,
) -> RunResult:
    model = task.initial_parameters(0)  # only its size: the coordinator makes the run's own
    model_bytes, tensors = sum(a.nbytes for a in model.values()), len(model)
    del model
    files = pki.server_files(pki_dir) if pki_dir is not None else None
    transport = GrpcTransport(
        spec=task_spec(experiment, task),
        run_id=opened.run_id,
        max_payload_bytes=4 * model_bytes + (1 << 20),
        max_tensors=tensors + 1,
        upload_budget=limits.budget_for(model_bytes),
        heartbeat_timeout=limits.heartbeat_timeout,
        mutual_tls=files is not None,
        audit=audit,
        allowed_sites=frozenset(a) if (a := experiment.federation.allowed_sites) is not None else None,
        revocations=(
            RevocationList(pki_dir / "crl.pem", files.ca, opened.store.directory / "crl-number")
            if pki_dir is not None and files is not None
            else None
        ),
    )
    cap = connection_cap(limits.max_connections)
    server = grpc.aio.server(
        options=SERVER_OPTIONS + server_options(cap), maximum_concurrent_rpcs=MAX_STREAMS
    )
    server.add_generic_rpc_handlers((transport.handler(),))
    if files is None:
        port = server.add_insecure_port(listen)
    else:
        credentials = grpc.ssl_server_credentials(
            [(files.key, files.certificate)], root_certificates=files.ca, require_client_auth=True
        )
        port = server.add_secure_port(listen, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    # Imports and start-up objects live for the whole run: keep them out of every GC pass.
    gc.freeze()
    await server.start()
    log.info(
        "listening on %s (port %d, %s, at most %d connections)",
        listen,
        port,
        "mutual TLS" if pki_dir else "INSECURE",
        cap,
    )
    if on_listening:
        on_listening(port)
    watched = ServerMetrics()
    board = (
        Dashboard(
            run_id=opened.run_id,
            rounds=experiment.federation.rounds,
            seen=transport.sessions_seen,
            history=opened.history,
        )
        if dashboard_at[0] is not None
        else None
    )
    transport.on_refused = lambda reason: watched.refused.labels(reason).inc()
    coordinator = Coordinator(
        experiment=experiment,
        task=task,
        transport=transport,
        store=FanOutStore([opened.store, AuditedRounds(audit), *trackers, watched, *filter(None, [board])]),
        test_data=task.test_data(seed=experiment.seed, partitions=experiment.simulation.sites),
        on_round=on_round,
        run_id=opened.run_id,
        resume=opened.state,
        history=opened.history,
    )
    watched.watch(
        connected=lambda: len(transport.available()), store_failures=lambda: len(coordinator.store_failures)
    )
    tls = (pki_dir / "server.crt", pki_dir / "server.key") if pki_dir is not None else None
    endpoints: list[WSGIServer] = []  # the HTTP ones: stopped with the run
    loop = asyncio.get_running_loop()
    watcher = asyncio.ensure_future(transport.watch_revocations())
    shed = lambda count: watched.refused.labels("address_cap").inc(count)  # noqa: E731
    per_address = 0 if listen.startswith("unix") else limits.per_address  # TCP's alone
    capping = asyncio.ensure_future(AddressCap(port, per_address, transport.session_peers, shed).run())
    with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # main thread only
        loop.add_signal_handler(signal.SIGHUP, lambda: transport.apply_revocations(force=True))
    try:
        if metrics_at[0] is not None:
            endpoints.append(_started(serve_metrics(metrics_at[0], watched, tls=tls), metrics_at[1]))
        if board is not None and dashboard_at[0] is not None:
            served = serve_dashboard(dashboard_at[0], board, state=opened.store.directory, tls=tls)
            endpoints.append(_started(served, dashboard_at[1]))
        return await coordinator.run()
    finally:
        watcher.cancel()
        capping.cancel()
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.remove_signal_handler(signal.SIGHUP)
        await server.stop(grace=2.0)
        for http in endpoints:
            http.shutdown()
            http.server_close()


def _started(served: tuple[WSGIServer, int], on_port: Callable[[int], None] | None) -> WSGIServer:
    """An HTTP endpoint now serving, its port told to `on_port`."""
    if on_port:
        on_port(served[1])
    return served[0]


class AuditedRounds:
    """A round store that writes each completed round to the audit log: who was aggregated,
    the model's SHA-256 (as in its lineage) and the run's epsilon."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self.last = 0  # the last round written: a retried write does not enter it twice

    def record(self, record: RoundRecord, state: RunState) -> None:
        if record.round <= self.last:
            return
        aggregated = sorted(
            s for s in record.sampled if s not in record.dropped or record.dropped[s].aggregated
        )
        self.audit.append(
            AuditKind.ROUND,
            run=state.run_id,
            round=record.round,
            sites=aggregated,
            model_sha256=model_digest(record.round, state.parameters),
            epsilon=record.epsilon,
        )
        self.last = record.round


def run_server(experiment: Experiment, **kwargs: object) -> RunResult | None:
    """`serve` with SIGTERM and Ctrl-C stopping the run cleanly; None when stopped early."""
    cap_malloc_arenas()  # a server process: before gRPC's threads allocate

    async def main() -> RunResult | None:
        current = asyncio.current_task()
        assert current is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, current.cancel)
        try:
            return await serve(experiment, **kwargs)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            log.warning("stopped by signal; sites were told the run ended")
            return None
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)

    return asyncio.run(main())
