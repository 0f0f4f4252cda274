"""Reading the kernel's connection tables and gRPC's peer strings for the per-address cap
(`fedcore.server.address_cap`); the cap itself is tested against a real server in
tests/integration/test_connection_flood.py."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from fedcore.server.address_cap import Connection, connections, peer_of

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def row(local: str, remote: str, state: str, inode: int) -> str:
    return f"   0: {local} {remote} {state} 00000000:00000000 00:00000000 00000000     0        0 {inode} 1\n"


def test_grpc_peers_are_read_as_address_and_port_with_ipv4_behind_ipv6_as_ipv4() -> None:
    assert peer_of("ipv4:10.0.0.7:52110") == (V4("10.0.0.7"), 52110)
    assert peer_of("ipv6:%5B::1%5D:43442") == (V6("::1"), 43442)  # what grpcio 1.85 writes
    assert peer_of("ipv6:[::1]:52110") == (V6("::1"), 52110)
    assert peer_of("ipv6:[::ffff:10.0.0.7]:5") == (V4("10.0.0.7"), 5)
    assert peer_of("ipv6:[fe80::1%25eth0]:7") == (V6("fe80::1"), 7)
    assert peer_of("unix:/tmp/socket") is None and peer_of("ipv4:nonsense:1") is None


def test_established_connections_to_the_port_are_read_from_both_tables(tmp_path: Path) -> None:
    tcp, tcp6 = tmp_path / "tcp", tmp_path / "tcp6"
    tcp.write_text(
        HEADER
        + row("0100007F:C350", "0100007F:D431", "01", 11)  # 127.0.0.1:50000 <- 127.0.0.1:54321
        + row("0100007F:C350", "0200007F:D432", "01", 12)  # from 127.0.0.2
        + row("0100007F:D431", "0100007F:C350", "01", 13)  # the client's end: another local port
        + row("0100007F:C350", "0100007F:D433", "03", 14)  # not established
        + row("0100007F:C350", "0100007F:D434", "01", 0)  # in the backlog: no socket yet
    )
    tcp6.write_text(
        HEADER
        + row("00000000000000000000000000000000:C350", "0000000000000000FFFF00000A00000A:0050", "01", 21)
        + row("00000000000000000000000001000000:C350", "00000000000000000000000001000000:0051", "01", 22)
    )
    assert list(connections(50000, (tcp, tcp6, tmp_path / "absent"))) == [
        Connection((V4("127.0.0.1"), 54321), 11),
        Connection((V4("127.0.0.2"), 54322), 12),
        Connection((V4("10.0.0.10"), 80), 21),
        Connection((V6("::1"), 81), 22),
    ]
