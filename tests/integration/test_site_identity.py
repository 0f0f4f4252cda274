"""Who may join, on the real gRPC server (127.0.0.1): one live session per site identity
(a second connection with the same name is refused and alarmed, never allowed to evict the
first: the review's two processes with one certificate evicted each other every second and
failed the run), names that `fedcore pki` would issue (no newline, no blank), and
`[federation] allowed_sites`."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedcore.client.agent import Outcome
from tests.integration.test_grpc_rounds import PARAMS, SlowBench, agent, experiment, federation
from tests.support.hostile_site import session


async def _hello(port: int, name: str) -> tuple[grpc.StatusCode | None, str]:
    """Say Hello as `name`; then hold the stream (heartbeats) until the run ends or the server refuses."""
    async with session(port, name, f"bench:{PARAMS}") as call:
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                if message.WhichOneof("body") == "run_end":
                    return None, ""
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details() or ""
        return None, ""


@pytest.mark.parametrize("name", ["", "a\nb", "site 1", "-x", "x" * 64, "ok\x1b[2K"])
def test_a_name_pki_would_not_issue_is_refused(tmp_path: Path, name: str) -> None:
    async def sites(port: int) -> list[object]:
        honest = [asyncio.ensure_future(agent(port, f"site-{k}").run()) for k in (1, 2)]
        odd = asyncio.ensure_future(_hello(port, name))
        return list(await asyncio.gather(*honest, odd))

    result, outcomes = asyncio.run(
        federation(experiment(federation__start_sites=2, federation__rounds=1), tmp_path, sites)
    )
    code, details = outcomes[2]
    assert code is grpc.StatusCode.UNAUTHENTICATED and "\n" not in details
    assert result.records[0].sampled == ["site-1", "site-2"]


def test_a_second_session_of_a_live_site_is_refused_and_never_evicts_the_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def sites(port: int) -> list[object]:
        first = [asyncio.ensure_future(agent(port, f"site-{k}", SlowBench()).run()) for k in (1, 2)]
        await asyncio.sleep(0.3)  # both connected and training: the copies come while they are alive
        copies = [asyncio.ensure_future(_hello(port, "site-1")) for _ in range(3)]
        return list(await asyncio.gather(*first, *copies))

    with caplog.at_level(logging.ERROR):
        result, outcomes = asyncio.run(
            federation(experiment(federation__start_sites=2, federation__rounds=3), tmp_path, sites)
        )
    assert outcomes[:2] == [Outcome.COMPLETED, Outcome.COMPLETED]
    assert all(code is grpc.StatusCode.ALREADY_EXISTS for code, _ in outcomes[2:])
    assert [r.sites for r in result.records] == [2, 2, 2] and all(r.attempt == 1 for r in result.records)
    np.testing.assert_allclose(result.parameters["w"], 0.03, rtol=1e-6)
    alarms = [r for r in caplog.records if "while its session is alive" in r.getMessage()]
    assert len(alarms) == 3


def test_only_allowed_sites_join(tmp_path: Path) -> None:
    async def sites(port: int) -> list[object]:
        allowed = [asyncio.ensure_future(agent(port, f"site-{k}").run()) for k in (1, 2)]
        stranger = asyncio.ensure_future(_hello(port, "site-9"))
        return list(await asyncio.gather(*allowed, stranger))

    e = experiment(
        federation__start_sites=2, federation__rounds=1, federation__allowed_sites=["site-1", "site-2"]
    )
    result, outcomes = asyncio.run(federation(e, tmp_path, sites))
    assert outcomes[2][0] is grpc.StatusCode.PERMISSION_DENIED and "allowed_sites" in outcomes[2][1]
    assert result.records[0].sampled == ["site-1", "site-2"]
