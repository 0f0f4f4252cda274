"""How many connections the server takes, sized from the process's file-descriptor limit:
without a cap, 21,000 idle TCP connections from anyone (no certificate needed) exhausted the
descriptors in 5.5 s and the next file the server opened failed (EMFILE). gRPC's own quota
(`grpc.max_allowed_incoming_connections`) refuses connections past the cap at accept, so
live sessions are never evicted to make room; a connection that has not finished its
TLS and HTTP/2 handshake within HANDSHAKE_SECONDS is closed, and so is one that holds no
stream for IDLE_SECONDS (a stream without a Hello is refused after 10 s), so idle sockets do
not hold the cap for long. What is not here: a cap per peer address (gRPC has none; a
firewall's connlimit does it, see server/README.md), and the CRL at the TLS handshake (a
revoked certificate is refused at its Hello)."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

RESERVED_FILES = 256  # descriptors kept for the run store, logs, the audit log, metrics, threads
MIN_CONNECTIONS = 64
HANDSHAKE_SECONDS = 5.0
IDLE_SECONDS = 20.0  # a connection with no stream open this long is closed (a site holds one always)


def descriptor_limit() -> int:
    """The soft limit on open files, raised to the hard limit first (servers are allowed to)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return int(soft)


def connection_cap(requested: int | None = None) -> int:
    """The most connections the server accepts at once: `requested`, or what the descriptor
    limit leaves after RESERVED_FILES; never more than that."""
    room = max(MIN_CONNECTIONS, descriptor_limit() - RESERVED_FILES)
    cap = room if requested is None else min(requested, room)
    if requested is not None and requested > room:
        log.warning("--max-connections %d exceeds what %d file descriptors allow: %d", requested, room, cap)
    return cap


def server_options(cap: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_allowed_incoming_connections", cap),
        ("grpc.server_handshake_timeout_ms", int(HANDSHAKE_SECONDS * 1000)),
        ("grpc.max_connection_idle_ms", int(IDLE_SECONDS * 1000)),
    ]
