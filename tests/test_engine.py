"""The Coordinator's round logic against a scripted transport (the true boundary):
dropouts, deadlines, refusals, malformed replies, retries, sampling, federated evaluation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from fedcore import load_experiment
from fedcore.aggregation import Drop, DropReason, RefusalCode
from fedcore.engine import Coordinator, Instruction, InstructionKind, MemoryStore, Reply, Transport
from fedcore.engine.coordinator import RoundFailed
from fedcore.errors import SiteUnavailable
from fedcore.tasks import build_task

Behaviour = Callable[[str, Instruction], Awaitable[Reply]]


class ScriptedTransport(Transport):
    def __init__(self, behaviours: dict[str, Behaviour]) -> None:
        self.behaviours = behaviours
        self.requests: list[tuple[str, Instruction]] = []
        self.finished: tuple[bool, str] | None = None

    async def wait_for_sites(self, count: int) -> None:
        assert len(self.behaviours) >= count

    def available(self) -> list[str]:
        return list(self.behaviours)

    async def request(self, site: str, instruction: Instruction) -> Reply:
        self.requests.append((site, instruction))
        return await self.behaviours[site](site, instruction)

    async def finish(self, *, completed: bool, reason: str) -> None:
        self.finished = (completed, reason)


def adds(value: float, examples: int = 1) -> Behaviour:
    async def behave(site: str, ins: Instruction) -> Reply:
        if ins.kind is InstructionKind.EVALUATE:
            return Reply(
                site, ins.kind, ins.round, num_examples=examples, metrics={"loss": value, "accuracy": value}
            )
        update = {"w": np.full_like(ins.parameters["w"], value)}
        return Reply(site, ins.kind, ins.round, num_examples=examples, update=update)

    return behave


async def vanishes(site: str, ins: Instruction) -> Reply:
    raise SiteUnavailable(site, "stream ended")


async def hangs(site: str, ins: Instruction) -> Reply:
    await asyncio.sleep(3600)
    raise AssertionError("unreachable")


async def refuses(site: str, ins: Instruction) -> Reply:
    return Reply(
        site, ins.kind, ins.round, refusal="budget exhausted", refusal_code=RefusalCode.PRIVACY_BUDGET
    )


def sends(update: dict[str, np.ndarray]) -> Behaviour:
    async def behave(site: str, ins: Instruction) -> Reply:
        return Reply(site, ins.kind, ins.round, num_examples=1, update=update)

    return behave


def run(behaviours: dict[str, Behaviour], **overrides: object) -> tuple[Coordinator, list, ScriptedTransport]:
    experiment = load_experiment().override(
        task__name="bench:8",
        **{
            "federation__rounds": 1,
            "federation__min_sites": 2,
            "federation__round_timeout": 5.0,
            **overrides,
        },
    )
    transport = ScriptedTransport(behaviours)
    store = MemoryStore()
    coordinator = Coordinator(
        experiment=experiment, task=build_task("bench:8"), transport=transport, store=store, test_data=None
    )
    asyncio.run(coordinator.run())
    return coordinator, store.records, transport


def test_weighted_mean_of_replies_becomes_the_model() -> None:
    coordinator, records, transport = run({"a": adds(1.0, 1), "b": adds(4.0, 3)})
    np.testing.assert_allclose(coordinator.parameters["w"], (1.0 * 1 + 4.0 * 3) / 4)
    assert records[0].sites == 2 and records[0].dropped == {}
    assert records[0].evaluation == "federated"  # the bench task has no held-out split
    assert records[0].accuracy == pytest.approx((1.0 * 1 + 4.0 * 3) / 4)
    assert transport.finished == (True, "run complete")


def test_vanished_refusing_and_malformed_sites_are_dropped_and_change_nothing() -> None:
    coordinator, records, _ = run(
        {
            "a": adds(1.0),
            "b": adds(3.0),
            "gone": vanishes,
            "no": refuses,
            "nan": sends({"w": np.full(8, np.nan, np.float32)}),
            "shape": sends({"w": np.zeros(9, np.float32)}),
            "dtype": sends({"w": np.zeros(8, np.float64)}),
            "names": sends({"v": np.zeros(8, np.float32)}),
        }
    )
    np.testing.assert_allclose(coordinator.parameters["w"], 2.0)
    record = records[0]
    assert record.sites == 2
    assert record.dropped["gone"] == Drop(DropReason.UNAVAILABLE, "fit", "stream ended")
    assert record.dropped["no"] == Drop(
        DropReason.REFUSED, "fit", "budget exhausted", RefusalCode.PRIVACY_BUDGET
    )
    for bad in ("nan", "shape", "dtype", "names"):
        assert record.dropped[bad].reason is DropReason.BAD_REPLY, record.dropped


def test_a_site_missing_the_deadline_is_dropped_and_the_round_completes() -> None:
    coordinator, records, _ = run(
        {"a": adds(1.0), "b": adds(1.0), "slow": hangs}, federation__round_timeout=0.3
    )
    assert records[0].dropped == {"slow": Drop(DropReason.DEADLINE, "fit")}
    np.testing.assert_allclose(coordinator.parameters["w"], 1.0)


def test_too_few_replies_retries_the_round_then_fails() -> None:
    attempts = 0

    async def flaky(site: str, ins: Instruction) -> Reply:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise SiteUnavailable(site, "first attempt lost")
        return await adds(1.0)(site, ins)

    _, records, _ = run({"a": adds(1.0), "flaky": flaky})
    assert records[0].attempt == 2

    with pytest.raises(RoundFailed):
        run({"a": adds(1.0), "gone": vanishes}, federation__max_round_retries=2)


def test_sampling_is_seeded_and_respects_sites_per_round() -> None:
    sites = {f"s{i}": adds(1.0) for i in range(20)}
    _, first, _ = run(sites, federation__sites_per_round=5, federation__rounds=3)
    _, again, _ = run(sites, federation__sites_per_round=5, federation__rounds=3)
    _, other, _ = run(sites, federation__sites_per_round=5, federation__rounds=3, data__seed=1)
    assert [r.sampled for r in first] == [r.sampled for r in again]
    assert [r.sampled for r in first] != [r.sampled for r in other]
    assert all(len(r.sampled) == 5 for r in first)


def test_each_site_gets_its_own_training_seed() -> None:
    _, _, transport = run({"a": adds(1.0), "b": adds(1.0)})
    seeds = {site: ins.config["seed"] for site, ins in transport.requests if ins.kind is InstructionKind.FIT}
    assert seeds["a"] != seeds["b"]


def test_replies_buffered_behind_a_late_first_site_are_not_lost() -> None:
    # Replies are folded in site order; the first site never answers. At the deadline it is
    # dropped and the replies that waited behind it still count.
    coordinator, records, _ = run(
        {"0-late": hangs, "a": adds(1.0), "b": adds(3.0)}, federation__round_timeout=0.3
    )
    assert records[0].dropped == {"0-late": Drop(DropReason.DEADLINE, "fit")} and records[0].sites == 2
    np.testing.assert_allclose(coordinator.parameters["w"], 2.0)


def test_malformed_evaluation_replies_are_dropped_not_fatal() -> None:
    async def no_accuracy(site: str, ins: Instruction) -> Reply:
        if ins.kind is InstructionKind.EVALUATE:
            return Reply(site, ins.kind, ins.round, num_examples=1, metrics={"loss": 0.5})
        return await adds(1.0)(site, ins)

    _, records, _ = run({"a": adds(1.0), "b": no_accuracy})
    assert records[0].accuracy == pytest.approx(1.0)  # from site a alone


def test_an_absurd_example_count_cannot_take_over_the_average() -> None:
    coordinator, records, _ = run({"a": adds(1.0), "b": adds(1.0), "greedy": adds(100.0, 10**12)})
    assert records[0].dropped["greedy"].reason is DropReason.BAD_REPLY
    np.testing.assert_allclose(coordinator.parameters["w"], 1.0)


def test_a_sites_own_evaluation_metrics_are_checked_and_capped() -> None:
    """Metric names are a site's text: only plain names and finite values, a few per reply,
    and only names most sites report reach the round's record (one site cannot crowd out
    the others'); loss and accuracy stay the engine's."""
    from fedcore.engine.gather import MAX_NAMED, EvaluationMetrics

    metrics = EvaluationMetrics()
    hostile = {"bad\nname": 1.0, "x" * 200: 1.0, "nan": float("nan"), "loss": 0.3, "accuracy": 0.9}
    hostile |= {f"m{i}": float(i) for i in range(100)} | {"f1": 0.5}
    honest = {"loss": 0.1, "accuracy": 0.5, "f1": 0.9}
    metrics.collect(Reply("a", InstructionKind.EVALUATE, 1, 10, metrics=hostile))
    metrics.collect(Reply("b", InstructionKind.EVALUATE, 1, 30, metrics=honest))
    metrics.collect(Reply("c", InstructionKind.EVALUATE, 1, 30, metrics=honest))
    assert metrics.means() == {"f1": pytest.approx(0.9)}  # a's f1 came after its 16 names
    many = EvaluationMetrics()
    for site in "abc":
        many.collect(
            Reply(
                site,
                InstructionKind.EVALUATE,
                1,
                1,
                metrics={"loss": 0.1, "accuracy": 0.5} | {f"m{i}": 1.0 for i in range(40)},
            )
        )
    assert len(many.means()) == min(16, MAX_NAMED)
