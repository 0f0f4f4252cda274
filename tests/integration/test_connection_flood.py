"""Anyone can open TCP connections: without a cap, 21,000 idle ones exhausted the server's
file descriptors and a write then ended the run. On the real server (127.0.0.1) with a small
cap, 2,000 idle connections (bounded in count and time) are refused past the cap, the
connected sites keep their sessions, the run completes with the exact model, and the
server holds at most the cap's sockets for them. And one address cannot take the whole cap:
past `per_address` connections without a session it is shut down, while the sites' own
sessions from that same address are kept."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from fedcore.client.agent import Outcome
from fedcore.server.app import serve
from fedcore.server.limits import ServerLimits
from tests.integration.test_grpc_rounds import SlowBench, agent, experiment

CAP, FLOOD = 64, 2000
PER_ADDRESS, ADDRESS_FLOOD = 8, 200


def flooded_run(
    tmp_path: Path, limits: ServerLimits, count: int, settle: float
) -> tuple[Any, list[object], int]:
    """Two sites connect and start round 1; then `count` idle connections from 127.0.0.1
    (their address). The run's result, the sites' outcomes, and how many of the flood's
    connections the server held `settle` seconds later."""
    process = psutil.Process()
    held: list[int] = []

    async def main() -> tuple[Any, list[object]]:
        listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        server = asyncio.ensure_future(
            serve(
                experiment(federation__start_sites=2, federation__rounds=4),
                listen="127.0.0.1:0",
                state=tmp_path / "state",
                pki_dir=None,
                on_listening=listening.set_result,
                limits=limits,
            )
        )
        port = await listening
        sites = [asyncio.ensure_future(agent(port, f"site-{k}", SlowBench()).run()) for k in (1, 2)]
        await asyncio.sleep(1.0)  # both connected and in round 1
        before = process.num_fds()
        flood = []
        for _ in range(count):  # connect() completes in the kernel's backlog whatever the server does
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            flood.append(s)
        await asyncio.sleep(settle)
        held.append(process.num_fds() - before - count)  # the server's side of the flood
        result = await asyncio.wait_for(server, 60)
        outcomes = await asyncio.gather(*sites)
        for s in flood:
            s.close()
        return result, outcomes

    result, outcomes = asyncio.run(main())
    return result, outcomes, held[0]


def test_an_idle_connection_flood_neither_stops_the_run_nor_exhausts_descriptors(tmp_path: Path) -> None:
    limits = ServerLimits(max_connections=CAP, per_address=0)  # the total cap alone
    result, outcomes, held = flooded_run(tmp_path, limits, FLOOD, 1.0)
    assert outcomes == [Outcome.COMPLETED, Outcome.COMPLETED]
    assert [r.sites for r in result.records] == [2, 2, 2, 2]
    np.testing.assert_allclose(result.parameters["w"], 0.04, rtol=1e-6)
    assert held <= CAP + 16, held


def test_one_address_cannot_hold_the_cap_and_its_honest_sessions_are_kept(tmp_path: Path) -> None:
    """The flood comes from 127.0.0.1, the address the two sites' sessions come from (one
    NAT): the server keeps at most PER_ADDRESS of the flood's connections, not the cap's 64,
    and the sites finish the run exactly."""
    limits = ServerLimits(max_connections=CAP, per_address=PER_ADDRESS)
    result, outcomes, held = flooded_run(tmp_path, limits, ADDRESS_FLOOD, 2.0)  # accepted, and swept
    assert outcomes == [Outcome.COMPLETED, Outcome.COMPLETED]
    assert [r.sites for r in result.records] == [2, 2, 2, 2]
    np.testing.assert_allclose(result.parameters["w"], 0.04, rtol=1e-6)
    assert held <= PER_ADDRESS + 8, held  # without the per-address cap: the cap's 64
    # The sites' sessions were never cut: no round lost a site or needed a second attempt.
    assert all(r.attempt == 1 and not r.dropped for r in result.records)
