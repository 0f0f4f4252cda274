"""What an operator watches: the server's Prometheus metrics (prometheus-client, a registry
of the server's own) fed by every completed round and by the transport, and the HTTP
endpoint that serves them with `/healthz` for liveness probes (`fedcore server --metrics`).
The endpoint binds to 127.0.0.1 unless told otherwise and serves TLS with the server's
certificate under `--pki` (`fedcore.server.http`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from fedcore.engine import RoundRecord
from fedcore.engine.run_state import RunState
from fedcore.server.http import plain, serve_wsgi

ROUND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, float("inf"))


class ServerMetrics:
    """The run's metrics; a round store (`record`) that updates them as rounds complete."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.round = Gauge("fedcore_round", "the last completed round", registry=r)
        self.sites_connected = Gauge("fedcore_sites_connected", "sites with a live session", registry=r)
        self.round_seconds = Histogram(
            "fedcore_round_seconds", "seconds a completed round took", buckets=ROUND_BUCKETS, registry=r
        )
        self.stage_seconds = Counter(
            "fedcore_stage_seconds",
            "seconds spent in each secure-aggregation exchange",
            ["stage"],
            registry=r,
        )
        self.bytes_sent = Counter("fedcore_bytes_sent", "model payload bytes sent to sites", registry=r)
        self.bytes_received = Counter("fedcore_bytes_received", "update payload bytes from sites", registry=r)
        self.refused = Counter(
            "fedcore_connections_refused", "site connections refused, by reason", ["reason"], registry=r
        )
        self.dropped = Counter(
            "fedcore_sites_dropped", "sites dropped from rounds, by reason", ["reason"], registry=r
        )
        self.epsilon = Gauge("fedcore_epsilon", "the run's differential-privacy epsilon so far", registry=r)
        self.accuracy = Gauge(
            "fedcore_accuracy", "the global model's accuracy after the last round", registry=r
        )
        self.loss = Gauge("fedcore_loss", "the global model's loss after the last round", registry=r)
        self.store_failures = Gauge(
            "fedcore_store_failures", "writes of a round that failed on I/O (then tried again)", registry=r
        )

    def record(self, record: RoundRecord, state: RunState) -> None:
        self.round.set(record.round)
        self.round_seconds.observe(record.seconds)
        self.bytes_sent.inc(record.bytes_sent)
        self.bytes_received.inc(record.bytes_received)
        for stage, figures in record.secure_aggregation.get("stages", {}).items():
            self.stage_seconds.labels(stage).inc(float(figures.get("seconds", 0.0)))
        for drop in record.dropped.values():
            self.dropped.labels(drop.reason.value).inc()
        for gauge, value in (
            (self.epsilon, record.epsilon),
            (self.accuracy, record.accuracy),
            (self.loss, record.loss),
        ):
            if value is not None:
                gauge.set(value)

    def watch(self, *, connected: Callable[[], int], store_failures: Callable[[], int]) -> None:
        """Read these two live, at every scrape."""
        self.sites_connected.set_function(connected)
        self.store_failures.set_function(store_failures)


def serve_metrics(
    listen: str, metrics: ServerMetrics, *, tls: tuple[Path, Path] | None = None
) -> tuple[WSGIServer, int]:
    """Serve /metrics and /healthz on `listen` in a daemon thread; (server, port)."""
    exposition = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return plain(start_response, "200 OK", "ok")
        if path == "/metrics":
            return exposition(environ, start_response)  # type: ignore[no-any-return]
        return plain(start_response, "404 Not Found", "/metrics or /healthz")

    httpd, _, bound = serve_wsgi(listen, app, tls=tls, name="metrics")
    return httpd, bound
