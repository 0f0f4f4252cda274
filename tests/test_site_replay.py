"""A site asked again for a fit it already made resends that very contribution, uncharged
(a server that crashed and redoes the round); into another secure sum, or for another
model, it trains afresh and is charged. Sites here are live objects that keep their state,
as a deployed site agent does."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from fedcore import load_experiment
from fedcore.aggregation import RoundInfo, build_pipeline
from fedcore.config import Experiment
from fedcore.engine import Coordinator, Instruction, InstructionKind, MemoryStore, Reply, Site, Transport
from fedcore.errors import SiteUnavailable
from fedcore.simulation.runners import make_site, site_name
from fedcore.tasks import build_task


def experiment(**overrides: object) -> Experiment:
    return load_experiment().override(
        **{
            "federation__rounds": 1,
            "simulation__sites": 3,
            "privacy__secure_rng": False,  # reproducible noise: tests only
            "privacy__noise_multiplier": 1.0,
            **overrides,
        }
    )


def spent(site: Site) -> list[int]:
    """How many mechanisms the site's ledger holds, per run."""
    return [len(m) for m in site.stages.privacy.ledger.runs.values()]


def fit(e: Experiment, site: Site, parameters: dict[str, np.ndarray], attempt: int = 1) -> Reply:
    pipeline = build_pipeline(e, supports_dp_sgd=True)
    info = RoundInfo("run-1", 1, attempt, (site.name,), 1, parameters, e.seed)
    config = {"local_epochs": 1, "batch_size": 32, "lr": 0.1, "weight_decay": 0.0, "seed": 7}
    instruction = Instruction(
        InstructionKind.FIT, 1, parameters, config, attempt, None, pipeline.plan(info), "fit"
    )
    return site.handle(instruction)


def breast_cancer_run(e: Experiment, transport: Transport) -> Coordinator:
    """A run of `breast_cancer` over `transport`, kept in memory."""
    task = build_task("breast_cancer")
    return Coordinator(
        experiment=e,
        task=task,
        transport=transport,
        store=MemoryStore(),
        test_data=task.test_data(seed=e.seed, partitions=e.simulation.sites),
    )


def test_the_same_dp_fit_is_resent_uncharged_and_another_model_is_trained_and_charged() -> None:
    e = experiment(privacy__mode="sample", privacy__secure_rng=True)  # fresh noise: a retrain would differ
    site = make_site(e, 1, live=True)
    model = build_task("breast_cancer").initial_parameters(0)
    first, again = fit(e, site, model), fit(e, site, model, attempt=2)
    assert first.refusal is None and again.refusal is None
    assert spent(site) == [1]
    for name in model:
        np.testing.assert_array_equal(first.update[name], again.update[name])  # type: ignore[index]
    assert again.metrics["epsilon"] == first.metrics["epsilon"]
    other = fit(e, site, {k: v + 0.01 for k, v in model.items()})
    assert spent(site) == [2]
    assert any(not np.array_equal(first.update[k], other.update[k]) for k in model)  # type: ignore[index]


class LiveSites(Transport):
    """Three live sites; `drops` names (attempt, site, exchange) where a site vanishes."""

    def __init__(self, e: Experiment, drops: set[tuple[int, str, str]]) -> None:
        self.sites = {site_name(k): make_site(e, k, live=True) for k in range(1, e.simulation.sites + 1)}
        self.drops = drops
        self.absent: set[str] = set()  # sites not connected

    async def wait_for_sites(self, count: int) -> None:
        return None

    def available(self) -> list[str]:
        return [s for s in self.sites if s not in self.absent]

    async def request(self, site: str, instruction: Instruction) -> Reply:
        if (instruction.attempt, site, instruction.exchange) in self.drops:
            raise SiteUnavailable(site, "vanished (test)")
        await asyncio.sleep(0)
        return self.sites[site].handle(instruction)  # one at a time: the sites share a task object

    async def finish(self, *, completed: bool, reason: str) -> None:
        return None


def test_a_retried_secure_round_gets_fresh_noise_and_is_charged_and_accounted() -> None:
    """An honest server retries a distributed-DP round whose first sum came from too few
    sites. Resending the first attempt's noised inputs into the second sum would let the
    server difference the two sums (a site's input with its own noise alone) while it
    accounts two independent sums: each attempt must bring fresh noise, charged."""
    e = experiment(
        privacy__mode="user-distributed",
        secure_aggregation__enabled=True,
        simulation__sites=5,
        federation__min_sites=5,
    )
    transport = LiveSites(e, drops={(1, "site-5", "masked_input")})
    coordinator = breast_cancer_run(e, transport)
    result = asyncio.run(coordinator.run())
    assert result.records[0].attempt == 2 and result.records[0].sites == 5
    ledgers = {name: spent(site) for name, site in transport.sites.items()}
    assert ledgers == {**{f"site-{k}": [2] for k in range(1, 5)}, "site-5": [1]}
    # Both sums are accounted, each for the sites whose updates are in it: as the sites' ledgers.
    rhos = coordinator.pipeline.state_dict()["distributed_noise"]["rhos"]
    assert {site: len(r) for site, r in rhos.items()} == {s: sum(v) for s, v in ledgers.items()}


class CrashingStore(MemoryStore):
    """The server 'dies' with the round aggregated but not stored."""

    def record(self, record, state):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt


@pytest.mark.parametrize("same_sample", [True, False], ids=["same-sites-back", "another-sample"])
def test_a_secure_round_redone_after_a_crash_gets_fresh_noise(same_sample: bool) -> None:
    """The server crashes after the secure sum of round 1 and redoes the round (4 of 5 sites
    sampled), with the same sites back or another sample. A masked input is never resent:
    the redo could be the same session over other survivors, and the two sums' difference
    would be one site's input with noise that cancels (an attacker review's finding). Sites
    encode afresh, with fresh noise, and are charged again."""
    e = experiment(
        privacy__mode="user-distributed",
        secure_aggregation__enabled=True,
        simulation__sites=5,
        federation__sites_per_round=4,
        federation__min_sites=4,
    )
    task = build_task("breast_cancer")
    transport = LiveSites(e, drops=set())

    def coordinator(store: MemoryStore) -> Coordinator:
        return Coordinator(
            experiment=e, task=task, transport=transport, store=store, test_data=None, run_id="run-x"
        )

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(coordinator(CrashingStore()).run())
    first = {name for name, site in transport.sites.items() if spent(site)}
    assert len(first) == 4
    gone = None if same_sample else max(first)
    if gone:
        transport.absent.add(gone)
    result = asyncio.run(coordinator(MemoryStore()).run())
    redone = first if same_sample else set(transport.sites) - {gone}
    assert set(result.records[0].sampled) == redone
    charged = {name: spent(site) for name, site in transport.sites.items()}
    times = {name: (name in first) + (name in redone) for name in transport.sites}
    assert charged == {name: [n] if n else [] for name, n in times.items()}
