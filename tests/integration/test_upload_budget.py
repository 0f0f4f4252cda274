"""The server's memory does not grow with the number of sites (real gRPC on 127.0.0.1): site
payloads are read within an upload budget, each reply is folded as it arrives, and a site
that holds a turn in the budget without sending is dropped, not left to stall the others."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import weakref
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedcore.client.agent import Outcome
from fedcore.engine import Reply
from fedcore.proto.v1 import federation_pb2 as pb
from fedcore.server import transport as transport_module
from fedcore.server.limits import ServerLimits, UploadBudget
from fedcore.server.sessions import EncodedModel, SiteSession
from fedcore.tasks.bench import Bench
from fedcore.wire import payload_messages
from tests.integration.test_grpc_rounds import agent, experiment, federation
from tests.support.hostile_site import instructions, result_for, send, session

PARAMS = 250_000  # 1 MB an update
UPDATE = PARAMS * 4


@pytest.fixture
def budgets(monkeypatch: pytest.MonkeyPatch) -> list[UploadBudget]:
    """Every upload budget a server makes, to read its peak afterwards."""
    made: list[UploadBudget] = []

    class Watched(UploadBudget):
        def __init__(self, limit: int) -> None:
            super().__init__(limit)
            made.append(self)

    monkeypatch.setattr(transport_module, "UploadBudget", Watched)
    return made


def test_a_reply_holds_its_turn_until_the_round_is_done_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A complete reply waiting to be folded is still in memory: another upload may start only
    once it is gone (the 3 x 512 MiB run had held three payloads within a budget of two)."""
    live: list[weakref.ref[Reply]] = []
    uncovered: list[int] = []  # bytes of live replies beyond the budget's count, at each new turn
    resolve = SiteSession.resolve

    def tracked(self: SiteSession, *args: object) -> Reply | None:
        reply = resolve(self, *args)  # type: ignore[arg-type]
        if reply is not None:
            live.append(weakref.ref(reply))
        return reply

    class Checked(UploadBudget):
        def _take(self, size: int) -> None:
            replies = [r for ref in live if (r := ref()) is not None]
            held = sum(a.nbytes for r in replies for a in (r.update or {}).values())
            del replies
            uncovered.append(max(0, held - self.used))
            super()._take(size)

    monkeypatch.setattr(SiteSession, "resolve", tracked)
    monkeypatch.setattr(transport_module, "UploadBudget", Checked)
    sites, rounds = 6, 2
    e = experiment(task__name=f"bench:{PARAMS}", federation__start_sites=sites, federation__rounds=rounds)
    limits = ServerLimits(upload_budget=UPDATE)
    result, outcomes = asyncio.run(federation(e, tmp_path, sites_of(sites), limits=limits))
    assert outcomes == [Outcome.COMPLETED] * sites and len(uncovered) == sites * rounds
    assert uncovered == [0] * len(uncovered)
    np.testing.assert_allclose(result.parameters["w"], 0.01 * rounds, rtol=1e-6)


def sites_of(count: int):  # type: ignore[no-untyped-def]
    async def start(port: int) -> list[object]:
        task = f"bench:{PARAMS}"
        return list(
            await asyncio.gather(*(agent(port, f"site-{k}", Bench(PARAMS), task).run() for k in range(count)))
        )

    return start


def test_payloads_in_flight_stay_within_the_budget(tmp_path: Path, budgets: list[UploadBudget]) -> None:
    sites, rounds = 8, 2
    e = experiment(task__name=f"bench:{PARAMS}", federation__start_sites=sites, federation__rounds=rounds)
    limits = ServerLimits(upload_budget=UPDATE)  # one update at a time
    encoded_after_round: list[int] = []  # the round's model as frames, once every site has it: gone

    def count_encoded(record: object) -> None:
        encoded_after_round.append(sum(isinstance(o, EncodedModel) for o in gc.get_objects()))

    result, outcomes = asyncio.run(
        federation(e, tmp_path, sites_of(sites), limits=limits, on_round=count_encoded)
    )
    assert outcomes == [Outcome.COMPLETED] * sites
    assert encoded_after_round == [0] * rounds
    assert all(r.sites == sites for r in result.records)
    np.testing.assert_allclose(result.parameters["w"], 0.01 * rounds, rtol=1e-6)
    (budget,) = budgets
    assert budget.peak == UPDATE and budget.used == 0  # never two at once, all given back


async def _stalling(port: int, gone: asyncio.Event) -> grpc.StatusCode | None:
    """Takes its turn in the budget (a header), then drips: 64 KiB every 0.8 s, with heartbeats.
    The review's attack: under a check of silence alone it held the turn for ever, and the
    honest sites waiting in line (heartbeats unread) were dropped for "no heartbeat"."""
    async with session(port, "staller", f"bench:{PARAMS}") as call:
        try:
            async for ins in instructions(call):
                header, pieces = payload_messages({"w": np.full(PARAMS, 0.01, np.float32)})
                result = result_for(ins)
                result.payload.CopyFrom(header)
                await call.write(pb.SiteMessage(result=result))
                data = b"".join(bytes(p) for p in pieces)
                for k in range(40):  # bounded: 32 s at most
                    await call.write(pb.SiteMessage(chunk=pb.Chunk(data=data[k << 16 : (k + 1) << 16])))
                    await call.write(pb.SiteMessage(heartbeat=pb.Heartbeat()))
                    await asyncio.sleep(0.8)
                    if gone.is_set():
                        break
                break
        except grpc.aio.AioRpcError as err:
            return err.code()
        except asyncio.InvalidStateError:
            return await call.code()
        call.cancel()
        return None


def test_a_site_that_holds_its_upload_turn_dripping_is_dropped_and_those_in_line_are_not(
    tmp_path: Path, budgets: list[UploadBudget], caplog: pytest.LogCaptureFixture
) -> None:
    gone = asyncio.Event()

    async def start(port: int) -> list[object]:
        staller = asyncio.ensure_future(_stalling(port, gone))
        await asyncio.sleep(0.5)  # it is first in line for the budget
        honest = await sites_of(3)(port)
        gone.set()
        return [*honest, await staller]

    e = experiment(task__name=f"bench:{PARAMS}", federation__start_sites=4, federation__rounds=2)
    # The honest sites wait in line longer than the heartbeat timeout: not a reason to drop them.
    limits = ServerLimits(upload_budget=UPDATE, heartbeat_timeout=1.0)
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        result, outcomes = asyncio.run(federation(e, tmp_path, start, limits=limits))
    assert outcomes[:3] == [Outcome.COMPLETED] * 3
    first = result.records[0]
    assert set(first.dropped) == {"staller"} and "upload stalled" in first.dropped["staller"].detail
    assert first.sites == 3
    assert time.perf_counter() - started < 20  # dropped after ~2 s, not at the round's deadline
    np.testing.assert_allclose(result.parameters["w"], 0.02, rtol=1e-6)
    assert budgets[0].used == 0


async def _misdated(port: int) -> grpc.StatusCode | None:
    """Answers a live request, but for the next round, with a whole update: the reply breaks
    the protocol only once its payload is complete (the attacker review's budget leak: its turn
    was never given back, and every honest upload after it waited until its request expired)."""
    async with session(port, "misdated", f"bench:{PARAMS}") as call:
        try:
            async for ins in instructions(call):
                result = result_for(ins)
                result.round = ins.round + 1
                await send(call, result, {"w": np.full(PARAMS, 0.01, np.float32)})
        except grpc.aio.AioRpcError as err:
            return err.code()
        return None


def test_a_reply_that_breaks_the_protocol_gives_its_turn_back(
    tmp_path: Path, budgets: list[UploadBudget]
) -> None:
    async def start(port: int) -> list[object]:
        return list(await asyncio.gather(sites_of(3)(port), _misdated(port)))

    e = experiment(
        task__name=f"bench:{PARAMS}", federation__start_sites=4, federation__rounds=3, federation__min_sites=3
    )
    result, (honest, misdated) = asyncio.run(
        federation(e, tmp_path, start, limits=ServerLimits(upload_budget=UPDATE))
    )
    assert honest == [Outcome.COMPLETED] * 3 and misdated == grpc.StatusCode.INVALID_ARGUMENT
    assert [r.sites for r in result.records] == [3, 3, 3]
    (budget,) = budgets
    assert budget.used == 0
