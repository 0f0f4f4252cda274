"""A site whose process is frozen (SIGSTOP: its connection stays open, it says nothing) does
not stretch the rounds: the server drops it once its heartbeats stop, so a round takes at
most the heartbeat timeout and a small margin, not the round's deadline (real gRPC on
127.0.0.1, the frozen site a real process)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from fedcore.aggregation import DropReason
from fedcore.client.agent import Outcome
from fedcore.engine import RoundRecord
from fedcore.server.limits import ServerLimits
from tests.integration.test_grpc_rounds import agent, experiment, federation

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 3.0  # the server's heartbeat timeout here; sites beat every 0.5 s


def test_a_frozen_site_is_dropped_within_the_heartbeat_timeout(tmp_path: Path) -> None:
    frozen: list[subprocess.Popen[bytes]] = []
    records: list[RoundRecord] = []

    def on_round(record: RoundRecord) -> None:
        records.append(record)
        if record.round == 1:
            os.kill(frozen[0].pid, signal.SIGSTOP)  # alive, connected, and silent from now on

    async def sites(port: int) -> list[object]:
        script = f"import asyncio; from tests.integration.test_grpc_rounds import agent; asyncio.run(agent({port}, 'frozen').run())"
        frozen.append(subprocess.Popen([sys.executable, "-c", script], cwd=ROOT))
        return list(await asyncio.gather(*(agent(port, f"site-{k}").run() for k in (1, 2, 3))))

    e = experiment(federation__start_sites=4, federation__rounds=3)
    try:
        result, outcomes = asyncio.run(
            federation(e, tmp_path, sites, on_round=on_round, limits=ServerLimits(heartbeat_timeout=TIMEOUT))
        )
    finally:
        for process in frozen:
            process.kill()  # SIGKILL ends a stopped process too
            process.wait(timeout=10)
    assert outcomes == [Outcome.COMPLETED] * 3
    second = records[1]
    assert "frozen" in second.sampled and second.dropped["frozen"].reason is DropReason.UNAVAILABLE
    assert "heartbeat" in second.dropped["frozen"].detail
    # The watch looks every TIMEOUT / 3: the silent site is gone at most 4/3 TIMEOUT after its last beat.
    assert second.seconds < TIMEOUT * 4 / 3 + 2.0, second.seconds
    assert records[2].seconds < 2.0 and "frozen" not in records[2].sampled  # gone: not waited for again
    np.testing.assert_allclose(result.parameters["w"], 0.03, rtol=1e-6)
