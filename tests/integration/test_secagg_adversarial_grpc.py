"""The adversarial-server suite over the real gRPC transport: real site agents (mutual TLS
kits, so they sign with their certificate keys) on 127.0.0.1 are driven by a scripted
dishonest server built from the real GrpcTransport, which sends each SecAgg+ message it
likes. The same attacks as `tests/test_secagg_adversarial.py` (whose loot and recovery
this reuses): no honest agent releases what would rebuild a site's input."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest

from fedcore import load_experiment, pki
from fedcore.aggregation.plans import QuantizePlan
from fedcore.client.agent import AgentSettings, SiteAgent
from fedcore.engine import Instruction, InstructionKind, Reply
from fedcore.secagg import shamir
from fedcore.secagg.common import SEED_BYTES, AbortReason, RoundParams
from fedcore.secagg.contribution import step_for_round
from fedcore.secagg.graph import default_degree, default_threshold, neighbour_graph
from fedcore.secagg.primitives import add_masks
from fedcore.secagg.quantize import dequantize
from fedcore.secagg.stages.advertise import ServerAdvertise
from fedcore.secagg.stages.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    MaskedInput,
    NeighbourKeys,
    NonceReveal,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
)
from fedcore.server.app import task_spec
from fedcore.server.transport import GrpcTransport
from fedcore.tasks.bench import STEP, Bench
from tests.test_secagg_adversarial import ROUND, Loot, attack_with_views, drop_plan, recover

pytestmark = pytest.mark.integration

PARAMS = 32
CLIP = 1.0
T = TypeVar("T")


def _reason(refusal: str) -> AbortReason:
    return next(r for r in AbortReason if refusal.startswith(r.value))


class DishonestServer:
    """A gRPC server that speaks the protocol's messages in whatever order and content the
    test scripts, to real agents; its own event loop runs in a thread so that the attacks,
    written against `Federation`'s synchronous interface, drive it unchanged."""

    def __init__(self, tmp_path: Path, n: int) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.pki = tmp_path / "pki"
        pki.init(self.pki, ["127.0.0.1"])
        self.sites = [f"site-{i:02d}" for i in range(n)]
        kits = {s: pki.site_files(pki.add_site(self.pki, s)) for s in self.sites}
        self.experiment = load_experiment().override(task__name=f"bench:{PARAMS}")
        self.port, self.agents = self.run(self._start(kits))

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _start(self, kits: dict[str, pki.TlsFiles]) -> tuple[int, list[asyncio.Future[Any]]]:
        task = Bench(PARAMS)
        self.transport = GrpcTransport(
            spec=task_spec(self.experiment, task),
            run_id="evil",
            max_payload_bytes=1 << 22,
            upload_budget=1 << 23,
        )
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((self.transport.handler(),))
        files = pki.server_files(self.pki)
        credentials = grpc.ssl_server_credentials(
            [(files.key, files.certificate)], root_certificates=files.ca, require_client_auth=True
        )
        port = self.server.add_secure_port("127.0.0.1:0", credentials)
        await self.server.start()
        agents = [
            asyncio.ensure_future(
                SiteAgent(
                    AgentSettings(
                        f"127.0.0.1:{port}", f"bench:{PARAMS}", "builtin:1/1", kits[s], give_up_after=20
                    ),
                    Bench(PARAMS),
                ).run()
            )
            for s in self.sites
        ]
        await asyncio.wait_for(self.transport.wait_for_sites(len(self.sites)), 30)
        return port, agents

    def close(self) -> None:
        async def stop() -> None:
            await self.transport.finish(completed=False, reason="the attack is over")
            await asyncio.gather(*self.agents, return_exceptions=True)
            await self.server.stop(grace=1)

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)

    def ask(self, instructions: dict[str, Instruction]) -> dict[str, Reply]:
        async def all_of() -> dict[str, Reply]:
            replies = await asyncio.gather(*(self.transport.request(s, i) for s, i in instructions.items()))
            return dict(zip(instructions, replies, strict=True))

        return self.run(all_of())


class GrpcFederation:
    """`Federation`'s interface (tests/test_secagg_adversarial.py) over real agents."""

    def __init__(self, server: DishonestServer, p: RoundParams) -> None:
        self.server, self.p = server, p
        self.loot = Loot()
        self.refused: dict[str, AbortReason] = {}

    def _stage(self, messages: dict[str, object], exchange: str) -> dict[str, Reply]:
        return self.server.ask(
            {
                s: Instruction(InstructionKind.STAGE, ROUND, {}, {}, 1, m, (), exchange)
                for s, m in messages.items()
            }
        )

    def advertise(self) -> dict[str, Reply]:
        return self._stage(dict.fromkeys(self.p.participants, self.p), "advertise")

    def honest_start(self) -> dict[str, NeighbourKeys]:
        replies = self.advertise()
        keys = {s: r.message for s, r in replies.items()}
        assert all(isinstance(k, AdvertiseKeys) for k in keys.values()), replies
        self.loot.keys = dict(keys)  # type: ignore[arg-type]
        requests, reveal = ServerAdvertise(self.p).collect(list(keys.values()))  # type: ignore[arg-type]
        nonces = {s: r.message for s, r in self._stage(dict(requests), "reveal").items()}
        assert all(isinstance(m, NonceReveal) for m in nonces.values()), nonces
        forwarded, server2 = reveal.collect(list(nonces.values()))  # type: ignore[arg-type]
        self.p = server2.params  # with the beacon: the graph the sites' nonces drew
        shares = {s: r.message for s, r in self._stage(dict(forwarded), "share_keys").items()}
        assert all(isinstance(m, ShareKeys) for m in shares.values())
        routed, _ = server2.collect(list(shares.values()))  # type: ignore[arg-type]
        plan = (QuantizePlan(CLIP, step_for_round(len(self.p.participants), clip=CLIP, bits=32), 1, 32),)
        model = {"w": np.zeros(PARAMS, np.float32)}
        config = {**Bench.defaults, "seed": 1}
        masked = self.server.ask(
            {
                s: Instruction(InstructionKind.FIT, ROUND, model, config, 1, routed[s], plan, "masked_input")
                for s in routed
            }
        )
        for site, reply in masked.items():
            assert isinstance(reply.message, MaskedInput), reply.refusal
            self.loot.masked[site] = reply.message.vector
        return forwarded

    def sign(self, cohorts: dict[str, frozenset[str]]) -> dict[str, bytes]:
        replies = self._stage({s: ConsistencyRequest(s, c) for s, c in cohorts.items()}, "consistency")
        out = {}
        for site, reply in replies.items():
            if reply.refusal is not None:
                self.refused[site] = _reason(reply.refusal)
            else:
                assert isinstance(reply.message, ConsistencySignature)
                out[site] = reply.message.signature
        return out

    def unmask(self, site: str, request: UnmaskRequest) -> AbortReason | None:
        (reply,) = self._stage({site: request}, "unmask").values()
        if reply.refusal is not None:
            return _reason(reply.refusal)
        assert isinstance(reply.message, UnmaskShares)
        self.loot.take(self.p, reply.message)
        return None


N = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    evil = DishonestServer(tmp_path_factory.mktemp("grpc-adversary"), N)
    yield evil
    evil.close()


def round_params(server: DishonestServer, attempt: int, **changes: Any) -> RoundParams:
    graph = neighbour_graph(server.sites, default_degree(N), session=f"evil/{ROUND}/{attempt}")
    t = default_threshold(max(len(p) for p in graph.values()))  # its degrees: any draw's
    p = RoundParams(
        ROUND, tuple(server.sites), default_degree(N), t, PARAMS + 1, 32, f"evil/{ROUND}/{attempt}"
    )
    return replace(p, **changes)


def test_over_grpc_an_honest_round_unmasks_only_the_sum(server: DishonestServer) -> None:
    p = round_params(server, attempt=1)
    fed = GrpcFederation(server, p)
    fed.honest_start()
    p = fed.p  # with the beacon
    everyone = frozenset(p.participants)
    signatures = fed.sign(dict.fromkeys(p.participants, everyone))
    for site in p.participants:
        assert (
            fed.unmask(site, UnmaskRequest(site, p.neighbours[site], frozenset(), everyone, signatures))
            is None
        )
    # All survived: removing every self mask (a threshold of seed shares each) leaves the
    # sum, the pairwise masks cancel; each bench site's input is STEP everywhere, weight 1.
    total = np.zeros(PARAMS + 1, np.uint32)
    for vector in fed.loot.masked.values():
        total += vector
    seeds = [
        shamir.combine(fed.loot.seed_shares[s], threshold=p.threshold, length=SEED_BYTES) for s in everyone
    ]
    add_masks(total, [(seed, True) for seed in seeds])
    flat = dequantize(total, step=step_for_round(N, clip=CLIP, bits=32))
    np.testing.assert_allclose(flat[:-1], N * STEP, atol=N * 1e-7)
    assert flat[-1] == pytest.approx(N, abs=1e-6)
    assert recover(p, fed.loot, p.participants[0], fed.loot.keys) is None  # a seed, but no pairwise key


def test_over_grpc_the_split_views_attack_gets_no_input(server: DishonestServer) -> None:
    p = round_params(server, attempt=2)
    fed = GrpcFederation(server, p)
    fed.honest_start()
    p = fed.p  # with the beacon
    target = p.participants[0]
    views = drop_plan(p, target)
    refusals = attack_with_views(fed, views)  # type: ignore[arg-type]
    assert recover(p, fed.loot, target, fed.loot.keys) is None
    lying = {s for s, view in views.items() if len(view) < N}
    assert {refusals.get(s, fed.refused.get(s)) for s in lying} == {AbortReason.BAD_SIGNATURES}


@pytest.mark.parametrize("threshold", ["one", "half"])
def test_over_grpc_a_low_threshold_is_refused_before_any_key_exists(
    server: DishonestServer, threshold: str
) -> None:
    base = round_params(server, attempt=3)
    k = min(len(peers) for peers in base.neighbours.values())
    fed = GrpcFederation(server, replace(base, threshold=1 if threshold == "one" else k // 2))
    replies = fed.advertise()
    assert {_reason(r.refusal) for r in replies.values() if r.refusal} == {AbortReason.UNSAFE_PARAMETERS}
    assert all(r.message is None for r in replies.values())
