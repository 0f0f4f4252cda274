"""The in-process transport: virtual sites, the same round code as over gRPC.

It also plays the federation's system heterogeneity, seeded by (seed, round, attempt, site): a
sampled site drops out mid-round with probability `dropout` (under secure aggregation, at
one of the four SecAgg+ stages, drawn uniformly), and is a straggler with probability
`stragglers`. A straggler does only part of its local epochs; its partial work
counts when the strategy accepts partial work (FedProx) and is dropped otherwise (FedAvg),
as in the FedProx paper. With `byzantine`, floor(fraction x sampled) of each round's sites
send an attack (`byzantine_attack`) instead of their update, to test robust aggregation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from fedcore.aggregation.secure_sum import EXCHANGES as SECURE_EXCHANGES
from fedcore.config import Experiment
from fedcore.engine import Instruction, InstructionKind, Reply, Transport
from fedcore.errors import SiteUnavailable
from fedcore.seeding import rng
from fedcore.simulation.byzantine import attack, attackers
from fedcore.simulation.runners import SiteRunner, site_name


class InProcessTransport(Transport):
    def __init__(self, experiment: Experiment, runner: SiteRunner, *, accepts_partial_work: bool) -> None:
        self.experiment = experiment
        self.runner = runner
        self.accepts_partial_work = accepts_partial_work
        self._index = {site_name(k): k for k in range(1, experiment.simulation.sites + 1)}
        self._attackers: dict[int, set[str]] = {}  # round -> its Byzantine sites

    async def wait_for_sites(self, count: int) -> None:
        if count > len(self._index):
            raise SiteUnavailable("*", f"the simulation has {len(self._index)} sites, the run needs {count}")

    def available(self) -> list[str]:
        return list(self._index)

    def _drops(self, site: str, instruction: Instruction) -> bool:
        """Whether `site` vanishes at this instruction: at its fit in a plain round; under
        secure aggregation, at the stage drawn for it (1 advertise .. 4 unmask; 3 is the fit)."""
        sim, seed = self.experiment.simulation, self.experiment.seed
        when = (instruction.round, instruction.attempt)  # a retried round draws afresh
        if not sim.dropout or rng(seed, "dropout", *when, site).random() >= sim.dropout:
            return False
        if not self.experiment.secure_aggregation.enabled:
            return instruction.kind is InstructionKind.FIT
        stage = int(rng(seed, "dropout-stage", *when, site).integers(1, 5))
        # Drawn over the four exchanges a site works in (the reveal is a nonce, the consistency
        # check a signature).
        worked = [e for e in SECURE_EXCHANGES if e not in ("reveal", "consistency")]
        return worked[stage - 1] == instruction.exchange

    def _heterogeneity(self, site: str, instruction: Instruction) -> Instruction:
        sim, seed = self.experiment.simulation, self.experiment.seed
        when = (instruction.round, instruction.attempt)
        draw = rng(seed, "straggler", *when, site)
        if sim.stragglers and draw.random() < sim.stragglers:
            if not self.accepts_partial_work:
                raise SiteUnavailable(site, "straggler: did not finish its local epochs (simulated)")
            epochs = int(instruction.config["local_epochs"])
            partial = int(draw.integers(1, epochs)) if epochs > 1 else 1
            return dataclasses.replace(instruction, config={**instruction.config, "local_epochs": partial})
        return instruction

    def sampled(self, round_number: int, attempt: int, sites: Sequence[str]) -> None:
        fraction = self.experiment.simulation.byzantine
        if fraction:
            chosen = attackers(list(sites), fraction, seed=self.experiment.seed, round_number=round_number)
            self._attackers = {round_number: chosen}

    def _lie(self, site: str, reply: Reply) -> Reply:
        """A Byzantine site sends an attack instead of its honest update (the difference from
        the global model), as its own reply: a site that lies."""
        if reply.update is None or site not in self._attackers.get(reply.round, ()):
            return reply
        kind = self.experiment.simulation.byzantine_attack
        lie = attack(reply.update, kind, seed=self.experiment.seed, round_number=reply.round, site=site)
        return dataclasses.replace(reply, update=lie)

    async def request(self, site: str, instruction: Instruction) -> Reply:
        k = self._index.get(site)
        if k is None:
            raise SiteUnavailable(site, "no such site")
        if self._drops(site, instruction):
            raise SiteUnavailable(site, "dropped out mid-round (simulated)")
        if instruction.kind is InstructionKind.FIT:
            instruction = self._heterogeneity(site, instruction)
        return self._lie(site, await self.runner.run(k, instruction))

    def state(self) -> Any:
        return self.runner.state_to_json()

    def load_state(self, state: Any) -> None:
        self.runner.load_state_json(state or {})

    async def finish(self, *, completed: bool, reason: str) -> None:
        self.runner.close()
