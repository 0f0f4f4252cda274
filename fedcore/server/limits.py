"""How many connections the server takes, sized from the process's file-descriptor limit:
without a cap, 21,000 idle TCP connections from anyone (no certificate needed) exhausted the
descriptors in 5.5 s and the next file the server opened failed (EMFILE). gRPC's own quota
(`grpc.max_allowed_incoming_connections`) refuses connections past the cap at accept, so
live sessions are never evicted to make room; a connection that has not finished its
TLS and HTTP/2 handshake within HANDSHAKE_SECONDS is closed, and so is one that holds no
stream for IDLE_SECONDS (a stream without a Hello is refused after 10 s), so idle sockets do
not hold the cap for long. The cap per peer address is `address_cap`'s. What is not here:
the CRL at the TLS handshake (a revoked certificate is refused at its Hello)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import logging
import os
import resource
from dataclasses import dataclass

log = logging.getLogger(__name__)

RESERVED_FILES = 256  # descriptors kept for the run store, logs, the audit log, metrics, threads
MIN_CONNECTIONS = 64
HANDSHAKE_SECONDS = 5.0
PER_ADDRESS = 32  # connections without a session from one address (`address_cap`)
IDLE_SECONDS = 20.0  # a connection with no stream open this long is closed (a site holds one always)


# Site payloads assembled at once, in bytes, at least: the server's memory does not grow with
# the number of sites (`UploadBudget`), and small updates still upload many at a time.
UPLOAD_BUDGET_FLOOR = 16 << 20


@dataclass(frozen=True)
class ServerLimits:
    """The operator's limits (`fedcore server --max-connections`, `--upload-budget`)."""

    max_connections: int | None = None  # None: what the descriptor limit allows (`connection_cap`)
    upload_budget: int | None = None  # bytes of payloads assembled at once (None: the server's default)
    heartbeat_timeout: float = 30.0  # a site silent this long is gone (sites beat every 5 s)
    per_address: int = PER_ADDRESS  # connections without a session, an address (0: no cap)

    def budget_for(self, update_bytes: int) -> int:
        """The upload budget: as asked, else UPLOAD_BUDGET_FLOOR or two updates of a larger model."""
        return self.upload_budget or max(UPLOAD_BUDGET_FLOOR, 2 * update_bytes)


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


class UploadBudget:
    """Bytes of site payloads the server assembles at once. A site whose payload does not fit
    waits, first come first served, before its first chunk is read (gRPC's flow control holds
    the rest at the site), so the server holds at most the budget in partial payloads whatever
    the number of sites; one payload larger than the whole budget still passes, alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def _fits(self, size: int) -> bool:
        return self.used == 0 or self.used + size <= self.limit

    def _take(self, size: int) -> None:
        self.used += size
        self.peak = max(self.peak, self.used)

    async def acquire(self, size: int) -> None:
        if not self._waiting and self._fits(size):
            self._take(size)
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((size, turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # granted as it was cancelled: give it back
                self.release(size)
            else:
                with contextlib.suppress(ValueError):  # release() may have dropped it already
                    self._waiting.remove((size, turn))
                self.release(0)  # those behind it may fit now
            raise

    def release(self, size: int) -> None:
        self.used -= size
        while self._waiting and self._fits(self._waiting[0][0]):
            size, turn = self._waiting.popleft()
            if not turn.done():  # else cancelled while queued: it takes nothing
                self._take(size)
                turn.set_result(None)


M_ARENA_MAX = -8  # glibc's mallopt parameter


def cap_malloc_arenas(arenas: int = 2) -> bool:
    """Let glibc's malloc keep at most `arenas` arenas. It gives threads that contend their own
    (up to 8 a core), and what gRPC's threads free in one is kept there, not reused by others:
    200 sites x 1M params peaked 39 MiB lower with 2 (551 -> 512 MiB), rounds no slower.
    False where there is nothing to tune (not glibc) or the operator set the arena count."""
    if "MALLOC_ARENA_MAX" in os.environ or "arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False
