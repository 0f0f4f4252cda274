"""SecAgg+ over the real gRPC server and site agents on 127.0.0.1: a site killed during the
masked-input stage is recovered and the round completes with the survivors' exact mean."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from fedcore.client.agent import Outcome
from tests.integration.test_grpc_rounds import PARAMS, SlowBench, agent, experiment, federation


def test_a_site_killed_during_masked_input_is_recovered(tmp_path: Path) -> None:
    victim_task = SlowBench(signal_from=1)  # signals as it starts training in round 1

    async def sites(port: int) -> list[object]:
        victim = asyncio.ensure_future(agent(port, "site-4", victim_task).run())
        others = [asyncio.ensure_future(agent(port, f"site-{k}").run()) for k in (1, 2, 3)]
        await asyncio.to_thread(victim_task.training.wait, 30)
        victim.cancel()  # its connection closes after it shared keys, before its masked input
        return [*await asyncio.gather(*others), await asyncio.gather(victim, return_exceptions=True)]

    exp = experiment(
        federation__start_sites=4,
        federation__min_sites=2,
        federation__rounds=2,
        secure_aggregation__enabled=True,
    )
    result, outcomes = asyncio.run(federation(exp, tmp_path, sites))
    first = result.records[0]
    assert first.sites == 3 and list(first.dropped) == ["site-4"]
    assert first.dropped["site-4"].startswith("masked_input")
    assert first.secure_aggregation["recovered"] == 1
    assert result.records[1].sites == 3
    np.testing.assert_allclose(result.parameters["w"], np.full(PARAMS, 0.02), atol=1e-6)
    assert outcomes[:3] == [Outcome.COMPLETED] * 3
