"""A cap per peer address on the connections that hold no site session. gRPC caps the
server's connections in all (`limits.server_options`) but not per address, so one address
could hold every place with idle or half-open connections and keep new sites out until
each timed out. gRPC gives Python no hook at accept, so the server sweeps its own TCP
connections (Linux: /proc/net/tcp and tcp6) twice a second, whenever it has more sockets
than sessions and one address's cap: past `per_address` connections without a session
from one address (an IPv6 /64), those seen longest are shut down (gRPC then closes them),
and only once an earlier sweep has seen them (a handshake under way is left to finish).
A connection that holds a site's session is never touched and not counted: honest sites
behind the same address as an attacker (one NAT) keep their sessions, and a site still in
its handshake competes only with that address's other newcomers."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import os
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Peer = tuple[Address, int]

SWEEP_SECONDS = 0.5
TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
ESTABLISHED = "01"


def peer_of(text: str) -> Peer | None:
    """gRPC's peer string ("ipv4:10.0.0.7:52110"; "ipv6:%5B::1%5D:52110", its brackets
    percent-encoded) as (address, port)."""
    kind, _, rest = urllib.parse.unquote(text).partition(":")
    host, _, port = rest.rpartition(":")
    if kind not in ("ipv4", "ipv6") or not port.isdigit():
        return None
    try:
        return _plain(ipaddress.ip_address(host.strip("[]").split("%")[0])), int(port)
    except ValueError:
        return None


def _plain(address: Address) -> Address:
    """An IPv4 peer of a dual-stack socket (::ffff:a.b.c.d) as the IPv4 address it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _address(hex_address: str) -> Address:
    """/proc/net/tcp's address: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return _plain(ipaddress.ip_address(words))


def group_of(address: Address) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """What one peer is capped as: an IPv4 address, or an IPv6 /64 (whoever has one address
    of a /64 usually has all of it)."""
    return ipaddress.ip_network(f"{address}/{32 if address.version == 4 else 64}", strict=False)


@dataclass(frozen=True)
class Connection:
    peer: Peer
    inode: int  # the socket's


def connections(port: int, tables: tuple[Path, ...] = TABLES) -> Iterator[Connection]:
    """The established TCP connections to local `port` in this network namespace."""
    needle = f":{port:04X} "
    for table in tables:
        with contextlib.suppress(FileNotFoundError), table.open() as lines:
            next(lines, None)  # the header
            for line in lines:
                if needle not in line:  # most of a busy namespace's lines: skipped unsplit
                    continue
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
                if state != ESTABLISHED or int(local.rsplit(":", 1)[1], 16) != port or not inode:
                    continue
                host, remote_port = remote.rsplit(":", 1)
                yield Connection((_address(host), int(remote_port, 16)), inode)


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def _descriptors() -> dict[int, int]:
    """This process's sockets: inode -> file descriptor."""
    found = {}
    for entry in os.scandir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(entry.path)
            if target.startswith("socket:["):
                found[int(target[8:-1])] = int(entry.name)
    return found


def _shut(fd: int, inode: int) -> bool:
    """Shut the connection down (its owner, gRPC, sees it end and closes it); False if `fd`
    no longer holds that socket."""
    try:
        copy = os.dup(fd)
    except OSError:
        return False
    try:
        if os.fstat(copy).st_ino != inode:  # closed and reused meanwhile
            return False
        with socket.socket(fileno=copy) as s:
            copy = -1  # the socket object owns the copy now
            s.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False
    finally:
        if copy >= 0:
            os.close(copy)


class AddressCap:
    """Keeps each peer address to `per_address` connections without a session; `sessions()`:
    the peers (gRPC's strings) of the live sessions; `on_shed(count)`: told how many each
    sweep shut down."""

    def __init__(
        self,
        port: int,
        per_address: int,
        sessions: Callable[[], set[str]],
        on_shed: Callable[[int], None] | None = None,
    ) -> None:
        self.port = port
        self.per_address = per_address
        self.sessions = sessions
        self.on_shed = on_shed
        self.shed = 0
        self.failures = 0
        self.first_seen: dict[int, float] = {}  # inode -> when a sweep first saw it

    def available(self) -> bool:
        return self.per_address > 0 and TABLES[0].exists() and Path("/proc/self/fd").is_dir()

    def sweep(self) -> int:
        """Shut down the longest-seen connections past the cap at each address; how many.
        Only this process's sockets count (the tables are the whole namespace's), and only
        those an earlier sweep saw are cut: a handshake under way is left to finish."""
        ours = _descriptors()
        found = [c for c in connections(self.port) if c.inode in ours]
        # The sessions are read after the tables: one made meanwhile is spared.
        held = {peer_of(text) for text in self.sessions()}
        if None in held:  # cut nothing rather than a session it cannot recognise
            raise ValueError(f"a session's peer this cap cannot read, of {sorted(self.sessions())[:3]}")
        now = time.monotonic()
        self.first_seen = {c.inode: self.first_seen.get(c.inode, now) for c in found}
        newcomers: dict[object, list[Connection]] = collections.defaultdict(list)
        for c in found:
            if c.peer not in held:
                newcomers[group_of(c.peer[0])].append(c)
        excess: list[Connection] = []
        for group in newcomers.values():
            if len(group) > self.per_address:
                older = sorted(
                    (c for c in group if self.first_seen[c.inode] < now),
                    key=lambda c: self.first_seen[c.inode],
                )
                excess += older[: len(group) - self.per_address]
        if not excess:
            return 0
        count = sum(_shut(ours[c.inode], c.inode) for c in excess)
        if count:
            before, self.shed = self.shed, self.shed + count
            if before.bit_length() != self.shed.bit_length():  # logged once a doubling
                addresses = ", ".join(sorted({str(c.peer[0]) for c in excess})[:5])
                log.warning(
                    "%d connections without a session shut down so far (at most %d an address): %s",
                    self.shed,
                    self.per_address,
                    addresses,
                )
            if self.on_shed is not None:
                self.on_shed(count)
        return count

    async def run(self) -> None:
        if not self.available():
            if self.per_address > 0:
                log.warning("no per-address connection cap here (needs Linux's /proc): use a firewall")
            return
        others = _open_files() - len(_descriptors())  # what is not a socket: files, pipes
        while True:
            # Reading the kernel's tables walks its whole connection hash (milliseconds of
            # kernel time, which slowed 50 x 1M rounds by 8%): only when there could be more
            # connections without a session than one address may hold, and in a thread.
            try:
                if _open_files() - others - len(self.sessions()) > self.per_address:
                    await asyncio.to_thread(self.sweep)
            except Exception:  # a sweep that fails must not end the defence
                self.failures += 1
                if self.failures & (self.failures - 1) == 0:  # logged once a doubling
                    log.exception("the per-address cap's sweep failed (%d times); it goes on", self.failures)
            await asyncio.sleep(SWEEP_SECONDS)
