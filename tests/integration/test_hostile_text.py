"""Site-supplied text on the real gRPC server (127.0.0.1): a 1 MB refusal full of newlines
and terminal escapes, and a reply with 256 metrics named with 14 KB each, must not forge
log lines or grow the run's files: each is cut and escaped where it arrives. The review's
case: 1,000 forged log lines from one refusal; 5.7 MB of metrics.jsonl and sites.jsonl from
two replies."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from fedcore.client.agent import Outcome
from fedcore.proto.v1 import federation_pb2 as pb
from fedcore.wire import config_to_wire
from tests.integration.test_grpc_rounds import PARAMS, agent, experiment, federation
from tests.support.hostile_site import instructions, result_for, send, session

FORGED = "\n2026-11-30 12:00:00 ERROR fedcore FORGED: the coordinator approved site evil\x1b[2K"


async def _talker(port: int, name: str, act: str) -> None:
    """A site that speaks the protocol and writes what it likes where text goes."""
    async with session(port, name, f"bench:{PARAMS}") as call:
        async for ins in instructions(call):
            result = result_for(ins)
            if act == "refusal":
                result.refusal = FORGED * (1_000_000 // len(FORGED))  # about 1 MB
                await call.write(pb.SiteMessage(result=result))
                continue
            config_to_wire(result.metrics, {f"m{k}_" + "x" * 14_000: 1.0 for k in range(255)} | {"ok": 2.0})
            # an honest bench site's update (a difference)
            await send(call, result, {"w": np.full(PARAMS, 0.01, np.float32)})


def test_long_and_multiline_site_text_is_cut_and_escaped_before_logs_and_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def sites(port: int) -> list[object]:
        honest = [asyncio.ensure_future(agent(port, f"site-{k}").run()) for k in (1, 2)]
        hostile = [asyncio.ensure_future(_talker(port, f"evil-{a}", a)) for a in ("refusal", "metrics")]
        return list(await asyncio.gather(*honest, *hostile))

    with caplog.at_level(logging.INFO):
        result, outcomes = asyncio.run(
            federation(experiment(federation__start_sites=4, federation__rounds=2), tmp_path, sites)
        )
    assert outcomes[:2] == [Outcome.COMPLETED, Outcome.COMPLETED] and len(result.records) == 2
    np.testing.assert_allclose(result.parameters["w"], 0.02, rtol=1e-6)
    for record in result.records:
        refusal = record.dropped["evil-refusal"].detail
        assert "\n" not in refusal and "\x1b" not in refusal and len(refusal) < 1_000
        assert "FORGED" in refusal  # kept, escaped: the operator still sees what the site said
    lines = [r.getMessage() for r in caplog.records]
    assert not any("\n" in line and "FORGED" in line for line in lines)
    assert sum(len(line) for line in lines if "evil" in line) < 20_000
    state = tmp_path / "state"
    for view in ("metrics.jsonl", "sites.jsonl"):
        assert (state / view).stat().st_size < 30_000, view
    rows = [json.loads(x) for x in (state / "metrics.jsonl").read_text().splitlines()]
    assert all(len(json.dumps(row)) < 15_000 for row in rows)
