"""The server's side of SecAgg+ folds each masked input into a running sum as it arrives:
it holds one vector, not one a site, whatever the number of sites; and a site speaks in its
own name only. Real site state machines (live `Site`s) answer through an in-process
transport, in a shuffled order. (The sum's independence of the order: test_secagg_misbehaving.)"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import weakref

import numpy as np

from fedcore import load_experiment
from fedcore.aggregation import DropReason
from fedcore.config import Experiment
from fedcore.engine import Coordinator, Instruction, Reply, Transport
from fedcore.secagg.stages.messages import MaskedInput
from fedcore.simulation.runners import make_site, site_name
from tests.test_site_replay import breast_cancer_run


def experiment(sites: int, need: int | None = None) -> Experiment:
    return load_experiment().override(
        federation__rounds=1,
        simulation__sites=sites,
        federation__min_sites=need or sites,
        secure_aggregation__enabled=True,
    )


class Sites(Transport):
    """Live sites answering one at a time, in an order drawn from `seed`; every masked input
    they send is watched (a weak reference: watching keeps nothing alive). `spoof`: a site
    whose masked input claims another site's name (`whole_reply`: its reply too);
    `bad_count`: a site whose masked input comes with a number of examples that is NaN."""

    def __init__(
        self,
        e: Experiment,
        seed: int,
        spoof: tuple[str, str] | None = None,
        whole_reply: bool = False,
        bad_count: str | None = None,
    ) -> None:
        self.sites = {site_name(k): make_site(e, k, live=True) for k in range(1, e.simulation.sites + 1)}
        self.order = random.Random(seed)
        self.spoof, self.whole_reply, self.bad_count = spoof, whole_reply, bad_count
        self.sent: list[weakref.ref[np.ndarray]] = []
        self.alive_when_masked_inputs_were_in: int | None = None

    async def wait_for_sites(self, count: int) -> None:
        return None

    def available(self) -> list[str]:
        return list(self.sites)

    async def request(self, site: str, instruction: Instruction) -> Reply:
        if instruction.exchange == "consistency" and self.alive_when_masked_inputs_were_in is None:
            self.alive_when_masked_inputs_were_in = sum(ref() is not None for ref in self.sent)
        for _ in range(self.order.randrange(1, 8)):  # the arrival order, shuffled
            await asyncio.sleep(0)
        reply = self.sites[site].handle(instruction)
        if isinstance(reply.message, MaskedInput):
            self.sent.append(weakref.ref(reply.message.vector))
            if self.spoof is not None and site == self.spoof[0]:
                message = dataclasses.replace(reply.message, site=self.spoof[1])
                reply = dataclasses.replace(reply, message=message)
                if self.whole_reply:
                    reply = dataclasses.replace(reply, site=self.spoof[1])
            if site == self.bad_count:
                reply = dataclasses.replace(reply, num_examples=float("nan"))
        return reply

    async def finish(self, *, completed: bool, reason: str) -> None:
        return None


def run(e: Experiment, transport: Sites) -> Coordinator:
    coordinator = breast_cancer_run(e, transport)
    asyncio.run(coordinator.run())
    return coordinator


def test_the_server_keeps_no_masked_input_once_it_is_in_the_sum() -> None:
    transport = Sites(experiment(12), seed=0)
    coordinator = run(experiment(12), transport)
    assert coordinator.records[0].sites == 12 and len(transport.sent) == 12
    # Once every masked input is in, not one is still held: the server kept only their sum.
    assert transport.alive_when_masked_inputs_were_in == 0


def test_a_masked_input_in_another_sites_name_is_dropped_and_the_round_completes() -> None:
    """A site sends its masked input under a neighbour's name: it would count twice or stand
    in for the neighbour. It is dropped (a bad reply), the neighbour's own counts, and the
    round completes with the others' sum."""
    e = experiment(6, need=5)
    coordinator = run(e, Sites(e, seed=1, spoof=("site-3", "site-4")))
    record = coordinator.records[0]
    assert record.sites == 5
    assert record.dropped["site-3"].reason is DropReason.BAD_REPLY
    assert "another site's name" in record.dropped["site-3"].detail
    assert "site-4" not in record.dropped


def test_a_reply_in_another_sites_name_cannot_get_that_site_excluded() -> None:
    """The spoofer sends its whole reply as a neighbour's, every attempt: were it taken as
    the neighbour's, the neighbour's own masked input would be its second and the neighbour
    would be named and excluded (an attacker review's finding). A reply speaks only for the
    site it was asked of: the spoofer is dropped, and the neighbour counts."""
    e = experiment(6, need=5)
    record = run(e, Sites(e, seed=2, spoof=("site-3", "site-4"), whole_reply=True)).records[0]
    assert record.sites == 5 and record.attempt == 1
    assert record.dropped["site-3"].detail == "a reply in another site's name"
    assert "site-4" not in record.dropped


def test_a_reply_refused_after_its_masked_input_arrives_is_not_in_the_sum() -> None:
    """A count that is not a number makes the reply malformed: it is refused before its
    masked input is folded, so a site recorded as dropped is never in the sum."""
    e = experiment(6, need=5)
    record = run(e, Sites(e, seed=3, bad_count="site-2")).records[0]
    assert record.dropped["site-2"].reason is DropReason.BAD_REPLY
    assert not record.dropped["site-2"].aggregated
    assert record.sites == 5
