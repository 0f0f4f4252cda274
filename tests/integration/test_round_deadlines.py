"""Rounds that end on time, on the real server (127.0.0.1): a sampled site that holds its
stream open but never answers does not hold every round to its deadline once a quorum has
replied (`[federation] quorum`, `grace`), and without a `round_timeout` the deadline
follows the recent rounds' durations instead of a fixed 600 s."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from fedcore.aggregation import DropReason
from fedcore.client.agent import Outcome
from fedcore.engine.gather import Deadlines
from tests.integration.test_grpc_rounds import agent, experiment, federation
from tests.integration.test_site_identity import _hello


def test_a_silent_site_costs_a_round_the_grace_not_the_deadline(tmp_path: Path) -> None:
    async def sites(port: int) -> list[object]:
        honest = [asyncio.ensure_future(agent(port, f"site-{k}").run()) for k in (1, 2)]
        silent = asyncio.ensure_future(_hello(port, "silent"))  # connected, sampled, never answers
        return list(await asyncio.gather(*honest, silent))

    e = experiment(
        federation__start_sites=3,
        federation__rounds=3,
        federation__round_timeout=20.0,
        federation__quorum=0.6,  # 2 of 3
        federation__grace=0.5,
    )
    result, outcomes = asyncio.run(federation(e, tmp_path, sites))
    assert outcomes[:2] == [Outcome.COMPLETED, Outcome.COMPLETED]
    for record in result.records:
        assert record.sites == 2 and record.dropped["silent"].reason is DropReason.DEADLINE
        assert record.seconds < 5.0, record.seconds  # 20 s without the quorum
    np.testing.assert_allclose(result.parameters["w"], 0.03, rtol=1e-6)


def test_the_default_deadline_follows_recent_rounds_with_a_floor() -> None:
    deadlines = Deadlines(None)
    assert deadlines.current() == Deadlines.FIRST
    for seconds in (2.0, 3.0, 1.0):
        deadlines.observe(seconds)
    assert deadlines.current() == Deadlines.FLOOR  # 4 x 3 s is below the floor
    deadlines.observe(40.0)
    assert deadlines.current() == 160.0
    for _ in range(Deadlines.RECENT):
        deadlines.observe(1.0)
    assert deadlines.current() == Deadlines.FLOOR  # the slow round is no longer recent
    assert Deadlines(30.0).current() == 30.0  # a job's round_timeout is kept as it is


def test_a_failed_attempt_doubles_the_next_deadline_up_to_the_first() -> None:
    """Rounds of 2 s set the deadline to the 60 s floor; a legitimately slower round would
    be cut at every attempt if failures did not widen it."""
    deadlines = Deadlines(None)
    for _ in range(Deadlines.RECENT):
        deadlines.observe(2.0)
    assert deadlines.current() == Deadlines.FLOOR
    deadlines.observe(None)
    assert deadlines.current() == 2 * Deadlines.FLOOR
    for _ in range(10):
        deadlines.observe(None)
    assert deadlines.current() == Deadlines.FIRST
