"""Payload headers are checked against the request they answer before anything is stored
(real gRPC server on 127.0.0.1): a header listing 100,000 empty tensors (the review's case
pinned the event loop: 112 rounds per 12 s fell to 2), an update whose shapes are not the
model's; and a site's message rate is bounded: a flood of replies to requests never made
(17,700/s grew the log by 26 MB), of heartbeats (11.7 s of CPU in 12 s), of 1-byte chunks."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedcore.client.agent import Outcome
from fedcore.config import Experiment
from fedcore.proto.v1 import federation_pb2 as pb
from fedcore.server import transport as transport_module
from fedcore.server.limits import ServerLimits
from fedcore.server.sessions import MESSAGE_BURST
from fedcore.tasks.bench import Bench
from fedcore.wire import payload_messages
from tests.integration.test_grpc_rounds import PARAMS, agent, experiment, federation
from tests.support.hostile_site import instructions, result_for, send, session

FLOOD = 3000


async def _hostile(port: int, name: str, act: str) -> grpc.StatusCode | None:
    async with session(port, name, f"bench:{PARAMS}") as call:
        try:
            async for ins in instructions(call):
                result = result_for(ins)
                if act == "many-tensors":
                    for k in range(100_000):
                        result.payload.tensors.add(name=f"t{k}", dtype=1, shape=[0])
                    await call.write(pb.SiteMessage(result=result))
                elif act == "wrong-shapes":  # the model's bytes, shaped otherwise
                    await send(call, result, {"w": np.zeros((PARAMS // 2, 2), np.float32)})
                elif act == "unknown-ids":  # then an honest answer
                    for k in range(FLOOD):
                        stray = pb.Result(request_id=10**9 + k, round=ins.round, kind=ins.kind, refusal="x")
                        await call.write(pb.SiteMessage(result=stray))
                    await send(call, result, {"w": np.full(PARAMS, 0.01, np.float32)})
                elif act == "heartbeats":
                    for _ in range(FLOOD):
                        await call.write(pb.SiteMessage(heartbeat=pb.Heartbeat()))
                elif act == "tiny-chunks":  # the model's bytes one at a time
                    header, _ = payload_messages({"w": np.full(PARAMS, 0.01, np.float32)})
                    result.payload.CopyFrom(header)
                    await call.write(pb.SiteMessage(result=result))
                    for _ in range(header.total_bytes):
                        await call.write(pb.SiteMessage(chunk=pb.Chunk(data=b"\0")))
        except grpc.aio.AioRpcError as err:
            return err.code()
        except asyncio.InvalidStateError:  # still writing when the server ended the stream
            return await call.code()
        return None


def test_hostile_headers_are_refused_before_anything_is_stored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    acts = ["many-tensors", "wrong-shapes", "unknown-ids", "heartbeats", "tiny-chunks"]

    async def sites(port: int) -> list[object]:
        honest = [asyncio.ensure_future(agent(port, f"site-{k}").run()) for k in (1, 2)]
        hostile = [asyncio.ensure_future(_hostile(port, f"evil-{a}", a)) for a in acts]
        return list(await asyncio.gather(*honest, *hostile))

    started = time.perf_counter()
    with caplog.at_level(logging.INFO):
        result, outcomes = asyncio.run(
            federation(experiment(federation__start_sites=7, federation__rounds=2), tmp_path, sites)
        )
    assert time.perf_counter() - started < 30
    assert outcomes[:2] == [Outcome.COMPLETED, Outcome.COMPLETED]
    # Each is refused at the message that breaks the rule, before anything is stored: a
    # header beyond the model, shapes not the model's, a flood of messages (replies to
    # requests never made, heartbeats) past the rate limit, chunks below 64 KiB.
    # (a site still writing when its stream is ended may see INTERNAL instead: the server's
    # log says why it ended each one)
    assert all(code is not None for code in outcomes[2:]), outcomes
    for act in acts:
        said = [r.getMessage() for r in caplog.records if f"site evil-{act} disconnected" in r.getMessage()]
        assert said and "ProtocolError" in said[0], (act, said)
    first = result.records[0]
    assert set(first.dropped) == {f"evil-{a}" for a in acts} and first.sites == 2
    np.testing.assert_allclose(result.parameters["w"], 0.02, rtol=1e-6)
    strays = [r for r in caplog.records if "unknown or expired" in r.getMessage()]
    assert len(strays) <= 2 * int(MESSAGE_BURST).bit_length()  # a line a doubling, not one a reply


async def _deaf(port: int, name: str, gone: asyncio.Event) -> grpc.StatusCode | None:
    """Says Hello, then heartbeats and never reads: the server's writes to it back up."""
    async with session(port, name, f"bench:{BIG}") as call:
        try:
            for _ in range(600):  # bounded: at most 60 s
                await call.write(pb.SiteMessage(heartbeat=pb.Heartbeat()))
                await asyncio.sleep(0.1)
                if gone.is_set():
                    break
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass
        call.cancel()
        return None


BIG = 1_000_000  # 4 MB a model: beyond what HTTP/2 flow control buffers for a deaf peer


def deaf_and_two_honest(gone: asyncio.Event, *, deaf_first: bool):  # type: ignore[no-untyped-def]
    """The sites: a deaf one (connected first, or with the others) and two honest ones; the
    deaf one stops once the honest ones are done (`gone`)."""

    async def sites(port: int) -> list[object]:
        if deaf_first:
            deaf = asyncio.ensure_future(_deaf(port, "deaf", gone))
            await asyncio.sleep(0.5)
        honest = [
            asyncio.ensure_future(agent(port, f"site-{k}", Bench(BIG), task_name=f"bench:{BIG}").run())
            for k in (1, 2)
        ]
        if not deaf_first:
            deaf = asyncio.ensure_future(_deaf(port, "deaf", gone))
        out = await asyncio.gather(*honest)
        gone.set()
        return [*out, await deaf]

    return sites


def deaf_experiment(*, rounds: int) -> Experiment:
    return experiment(
        task__name=f"bench:{BIG}",
        federation__start_sites=3,
        federation__rounds=rounds,
        federation__quorum=0.6,
        federation__grace=0.5,
    )


def test_a_site_that_does_not_read_is_dropped_before_a_second_model_waits_for_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gone = asyncio.Event()

    sites = deaf_and_two_honest(gone, deaf_first=False)
    e = deaf_experiment(rounds=5)
    with caplog.at_level(logging.WARNING):
        result, outcomes = asyncio.run(federation(e, tmp_path, sites))
    assert outcomes[:2] == [Outcome.COMPLETED, Outcome.COMPLETED] and len(result.records) == 5
    assert any("does not read its stream" in r.getMessage() for r in caplog.records)
    # gRPC takes what HTTP/2 and its own buffers hold (a model or two here); then one model
    # waits in the queue, and the next instruction disconnects the site: never sampled after.
    sampled = [r.round for r in result.records if "deaf" in r.sampled]
    assert sampled == list(range(1, len(sampled) + 1)) and len(sampled) <= 4 and 5 not in sampled
    np.testing.assert_allclose(result.parameters["w"], 0.05, rtol=1e-6)


def test_a_site_that_does_not_read_cannot_hold_the_downloads_of_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Payload frames in write are bounded for all sites together (DOWNLOAD_FRAMES; 1,000 sites
    had held a 256 KiB frame each). gRPC takes a whole model for a deaf site (round 1); the
    next one blocks in write, holding the only place here: the deaf site keeps it for the
    heartbeat timeout at most, then is gone, and the honest sites' downloads go on (without the timeout, round 2 fails)."""
    monkeypatch.setattr(transport_module, "DOWNLOAD_FRAMES", 1)
    gone = asyncio.Event()
    timeout = 3.0

    sites = deaf_and_two_honest(gone, deaf_first=True)
    e = deaf_experiment(rounds=3)
    started = time.perf_counter()
    with caplog.at_level(logging.INFO):
        result, outcomes = asyncio.run(
            federation(e, tmp_path, sites, limits=ServerLimits(heartbeat_timeout=timeout))
        )
    assert outcomes[:2] == [Outcome.COMPLETED, Outcome.COMPLETED] and len(result.records) == 3
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "site deaf disconnected: SiteUnavailable: site deaf: it took no payload chunk for 3 s" in said
    assert time.perf_counter() - started < 3 * timeout + 10
    np.testing.assert_allclose(result.parameters["w"], 0.03, rtol=1e-6)
