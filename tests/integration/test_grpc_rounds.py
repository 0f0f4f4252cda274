"""The real gRPC server and site agents on 127.0.0.1, in one process: a site that vanishes
mid-round is dropped, malformed messages are refused and change nothing, a site offering
another task is rejected."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fedcore import load_experiment
from fedcore.client.agent import AgentSettings, Outcome, SiteAgent
from fedcore.config import Experiment
from fedcore.engine import RoundRecord, RunResult
from fedcore.proto.v1 import federation_pb2 as pb
from fedcore.proto.v1 import federation_pb2_grpc as pb_grpc
from fedcore.server.app import serve
from fedcore.tasks import SiteData, TrainSettings, build_task
from fedcore.tasks.bench import Bench
from fedcore.tensors import PayloadAssembler
from fedcore.wire import PROTOCOL_VERSION, payload_messages

PARAMS = 64


class SlowBench(Bench):
    """Takes a while to train; from round `signal_from` on, signals when training starts
    (time to kill the site mid-round)."""

    def __init__(self, signal_from: int = 10**9) -> None:
        super().__init__(PARAMS)
        self.signal_from = signal_from
        self.training = threading.Event()

    def fit(self, parameters, data: SiteData, settings: TrainSettings):  # type: ignore[no-untyped-def]
        if self.rounds_seen >= self.signal_from - 1:
            self.training.set()
        self.rounds_seen += 1
        time.sleep(0.5)
        return super().fit(parameters, data, settings)

    rounds_seen = 0


def experiment(**overrides: object) -> Experiment:
    settings: dict[str, object] = {
        "task__name": f"bench:{PARAMS}",
        "federation__rounds": 2,
        "federation__round_timeout": 20.0,
        "federation__max_examples_per_site": 1,  # a bench site's count: weight 1, exact secure sums
        **overrides,
    }
    return load_experiment().override(**settings)


def agent(port: int, name: str, task: Bench | None = None, task_name: str = f"bench:{PARAMS}") -> SiteAgent:
    settings = AgentSettings(
        server=f"127.0.0.1:{port}",
        task_name=task_name,
        data_uri="builtin:1/1",
        tls=None,
        site_name=name,
        heartbeat_interval=0.5,
        give_up_after=5.0,
    )
    return SiteAgent(settings, task or Bench(PARAMS))


async def federation(
    exp: Experiment,
    tmp_path: Path,
    start_sites: Callable[[int], Awaitable[list[Any]]],
    *,
    pki_dir: Path | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    **server: Any,
) -> tuple[RunResult, list[Any]]:
    """Serve `exp` on a free port (insecurely without `pki_dir`; `server`: more of `serve`'s
    arguments) and run the sites `start_sites(port)` returns."""
    listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.ensure_future(
        serve(
            exp,
            listen="127.0.0.1:0",
            state=tmp_path / "state",
            pki_dir=pki_dir,
            on_listening=listening.set_result,
            on_round=on_round,
            **server,
        )
    )
    port = await listening
    outcomes = await start_sites(port)
    result = await asyncio.wait_for(server, 60)
    return result, outcomes


def test_a_site_killed_mid_round_is_dropped_and_the_run_completes(tmp_path: Path) -> None:
    # All three are connected before round 1; in round 2 the victim's process dies while it trains.
    victim_task = SlowBench(signal_from=2)

    async def sites(port: int) -> list[object]:
        victim = asyncio.ensure_future(agent(port, "site-3", victim_task).run())
        others = [asyncio.ensure_future(agent(port, f"site-{k}", SlowBench()).run()) for k in (1, 2)]
        await asyncio.to_thread(victim_task.training.wait, 30)
        victim.cancel()  # its connection closes mid-round
        return [*await asyncio.gather(*others), await asyncio.gather(victim, return_exceptions=True)]

    result, outcomes = asyncio.run(
        federation(experiment(federation__start_sites=3, federation__rounds=3), tmp_path, sites)
    )
    second = result.records[1]
    assert second.sampled == ["site-1", "site-2", "site-3"]
    assert second.sites == 2 and list(second.dropped) == ["site-3"] and second.attempt == 1
    assert result.records[2].sampled == ["site-1", "site-2"]
    np.testing.assert_allclose(result.parameters["w"], 0.03, rtol=1e-6)
    assert outcomes[:2] == [Outcome.COMPLETED, Outcome.COMPLETED]


async def _evil(port: int, name: str, act: str) -> grpc.StatusCode | None:
    """A hand-written site that follows the protocol until the payload, then misbehaves."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = pb_grpc.FederationStub(channel).Session()
        await call.write(
            pb.SiteMessage(
                hello=pb.Hello(protocol_version=PROTOCOL_VERSION, task=f"bench:{PARAMS}", site_name=name)
            )
        )
        assert (await call.read()).WhichOneof("body") == "welcome"
        ins = (await call.read()).instruction
        assembler = PayloadAssembler(ins.payload)
        while not assembler.complete:
            assembler.add((await call.read()).chunk.data)
        good = {"w": np.full(PARAMS, 0.01, np.float32)}
        result = pb.Result(request_id=ins.request_id, round=ins.round, kind=ins.kind, num_examples=1)
        if act == "wrong-round":
            result.round = ins.round + 7
        if act == "inflated":  # the review's case: +1000 claimed for a billion examples
            result.num_examples = 10**9
            good = {"w": np.full(PARAMS, 1000.0, np.float32)}
        if act == "orphan-chunk":
            await call.write(pb.SiteMessage(chunk=pb.Chunk(data=b"\x00" * 16)))
        else:
            update = {"w": np.full(PARAMS, np.nan, np.float32)} if act == "nan" else good
            if act == "huge-header":
                update = {"w": np.zeros(10_000_000, np.float32)}
            header, pieces = payload_messages(update)
            result.payload.CopyFrom(header)
            await call.write(pb.SiteMessage(result=result))
            if act == "too-many-bytes":  # the last chunk runs past the announced size
                pieces = [*pieces[:-1], pieces[-1] + b"\x00" * 8]
            if act != "huge-header":
                for piece in pieces:
                    await call.write(pb.SiteMessage(chunk=pb.Chunk(data=piece)))
            if act == "decline-after-result":  # took part, then tries to write a reason into the record
                await call.write(pb.SiteMessage(decline=pb.Decline(reason="\x1b[31mforged\nline")))
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                if message.WhichOneof("body") == "run_end":
                    return None
        except grpc.aio.AioRpcError as err:
            return err.code()
        return None


def test_malformed_messages_are_refused_and_change_nothing(tmp_path: Path) -> None:
    acts = ["wrong-round", "orphan-chunk", "nan", "huge-header", "too-many-bytes"]

    async def sites(port: int) -> list[object]:
        honest = [asyncio.ensure_future(agent(port, f"site-{k}").run()) for k in (1, 2)]
        evil = [asyncio.ensure_future(_evil(port, f"evil-{act}", act)) for act in acts]
        return list(await asyncio.gather(*honest, *evil))

    result, outcomes = asyncio.run(
        federation(experiment(federation__start_sites=7, federation__rounds=1), tmp_path, sites)
    )
    record = result.records[0]
    assert record.sites == 2
    assert set(record.dropped) == {f"evil-{a}" for a in acts}
    # Exactly the honest sites' mean: nothing the evil sites sent reached the model.
    np.testing.assert_array_equal(result.parameters["w"], np.full(PARAMS, 0.01, np.float32))
    assert outcomes[:2] == [Outcome.COMPLETED, Outcome.COMPLETED]
    protocol_breakers = dict(zip(acts, outcomes[2:], strict=True))
    for act in ("wrong-round", "orphan-chunk", "huge-header", "too-many-bytes"):
        assert protocol_breakers[act] == grpc.StatusCode.INVALID_ARGUMENT, protocol_breakers


def test_a_site_that_took_part_cannot_decline_the_job(tmp_path: Path) -> None:
    async def sites(port: int) -> list[object]:
        honest = [asyncio.ensure_future(agent(port, f"site-{k}").run()) for k in (1, 2)]
        evil = asyncio.ensure_future(_evil(port, "evil", "decline-after-result"))
        return list(await asyncio.gather(*honest, evil))

    result, outcomes = asyncio.run(
        federation(experiment(federation__start_sites=3, federation__rounds=2), tmp_path, sites)
    )
    assert outcomes[2] == grpc.StatusCode.INVALID_ARGUMENT
    assert all(not r.declined for r in result.records)


def test_a_site_offering_another_task_is_rejected(tmp_path: Path) -> None:
    async def sites(port: int) -> list[object]:
        wrong = await agent(port, "wrong", task=None, task_name="digits").run()
        good = [asyncio.ensure_future(agent(port, f"site-{k}").run()) for k in (1, 2)]
        return [wrong, *await asyncio.gather(*good)]

    result, outcomes = asyncio.run(federation(experiment(federation__rounds=1), tmp_path, sites))
    assert outcomes == [Outcome.REJECTED, Outcome.COMPLETED, Outcome.COMPLETED]
    assert result.records[0].sampled == ["site-1", "site-2"]


@pytest.mark.parametrize("uri", ["builtin:1/1"])
def test_bench_task_is_installed(uri: str) -> None:
    assert build_task(f"bench:{PARAMS}").site_data(uri, partition="iid", seed=0, partitions=1)


def test_sites_started_before_the_server_connect_with_backoff(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])

    async def scenario() -> tuple[RunResult, list[Outcome]]:
        sites = [asyncio.ensure_future(agent(port, f"site-{k}").run()) for k in (1, 2)]
        await asyncio.sleep(1.5)  # the sites retry against a closed port meanwhile
        result = await serve(experiment(), listen=f"127.0.0.1:{port}", state=tmp_path / "state", pki_dir=None)
        return result, list(await asyncio.gather(*sites))

    result, outcomes = asyncio.run(scenario())
    assert outcomes == [Outcome.COMPLETED, Outcome.COMPLETED]
    assert [r.sites for r in result.records] == [2, 2]


class LyingBench(Bench):
    """An honest site until round 2; then its update is not finite (a malformed reply), in
    that round only (`once`: a numerical blow-up) or in every round after."""

    def __init__(self, params: int, *, once: bool) -> None:
        super().__init__(params)
        self.once = once
        self.rounds_seen = 0

    def fit(self, parameters, data: SiteData, settings: TrainSettings):  # type: ignore[no-untyped-def]
        self.rounds_seen += 1
        outcome = super().fit(parameters, data, settings)
        if self.rounds_seen == 2 or (self.rounds_seen > 2 and not self.once):
            outcome.parameters["w"][0] = np.nan
        return outcome


def test_a_site_that_keeps_sending_malformed_replies_is_excluded_for_the_rest_of_the_run(
    tmp_path: Path,
) -> None:
    """Three malformed updates exclude a site (refused at reconnect, audited); one, which an
    honest numerical blow-up can cause, only drops it from that round."""
    import json

    from fedcore.engine.exclusion import STRIKES

    async def sites(port: int) -> list[object]:
        liar = asyncio.ensure_future(agent(port, "liar", LyingBench(PARAMS, once=False)).run())
        others = [
            asyncio.ensure_future(agent(port, "wobbly", LyingBench(PARAMS, once=True)).run()),
            *(asyncio.ensure_future(agent(port, f"site-{k}").run()) for k in (1, 2)),
        ]
        first = await liar
        again = await agent(port, "liar").run()  # an honest reconnect under the same name
        return [first, again, *await asyncio.gather(*others)]

    rounds = STRIKES + 3
    result, outcomes = asyncio.run(
        federation(experiment(federation__start_sites=4, federation__rounds=rounds), tmp_path, sites)
    )
    assert outcomes == [Outcome.REJECTED, Outcome.REJECTED, *[Outcome.COMPLETED] * 3]
    assert [r.dropped["liar"].reason.value for r in result.records[1 : STRIKES + 1]] == [
        "bad reply"
    ] * STRIKES
    assert "wobbly" in result.records[1].dropped and "wobbly" not in result.records[2].dropped
    assert all(r.sampled == ["site-1", "site-2", "wobbly"] for r in result.records[STRIKES + 1 :])
    log = [json.loads(line) for line in (tmp_path / "state" / "audit.log").read_text().splitlines()]
    assert [e["data"]["site"] for e in log if e["kind"] == "excluded"] == ["liar"]
    refused = [e["data"] for e in log if e["kind"] == "connection refused"]
    assert any(d["site"] == "liar" and "excluded" in d["reason"] for d in refused)


@pytest.mark.parametrize("bound", [None, 3])  # the task's (100,000), the job's
def test_a_site_claiming_a_billion_examples_weighs_the_public_bound(
    tmp_path: Path, bound: int | None
) -> None:
    """A count is a site's word: it weighs at most [federation] max_examples_per_site. The
    liar still moves the model by what its update says (what clipping and robust rules are
    for), but its weight is the bound's, not a billion's: before, +1000 made the model
    1001.11 instead of 1.12."""

    async def sites(port: int) -> list[object]:
        honest = [asyncio.ensure_future(agent(port, f"site-{k}").run()) for k in (1, 2)]
        liar = asyncio.ensure_future(_evil(port, "liar", "inflated"))
        return list(await asyncio.gather(*honest, liar))

    e = experiment(federation__start_sites=3, federation__rounds=1)
    e = (
        e.override(federation__max_examples_per_site=bound)
        if bound
        else load_experiment(None).override(
            task__name=e.task.name, federation__start_sites=3, federation__rounds=1
        )
    )
    result, _ = asyncio.run(federation(e, tmp_path, sites))
    cap = bound or Bench.max_examples_per_site
    expected = (2 * min(1, cap) * 0.01 + cap * 1000.0) / (2 * min(1, cap) + cap)
    np.testing.assert_allclose(result.parameters["w"], expected, rtol=1e-5)
    assert result.records[0].examples == 2 + cap
