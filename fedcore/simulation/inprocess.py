"""The in-process transport: virtual sites, the same round code as over gRPC.

It also plays the federation's system heterogeneity, seeded by (seed, round, attempt, site): a
sampled site drops out mid-round with probability `dropout`, and is a straggler with
probability `stragglers`. A straggler does only part of its local epochs; its partial work
counts when the strategy accepts partial work (FedProx) and is dropped otherwise (FedAvg),
as in the FedProx paper.
"""

from __future__ import annotations

import dataclasses

from fedcore.config import Experiment
from fedcore.engine import Instruction, InstructionKind, Reply, Transport
from fedcore.errors import SiteUnavailable
from fedcore.seeding import rng
from fedcore.simulation.runners import SiteRunner, site_name


class InProcessTransport(Transport):
    def __init__(self, experiment: Experiment, runner: SiteRunner, *, accepts_partial_work: bool) -> None:
        self.experiment = experiment
        self.runner = runner
        self.accepts_partial_work = accepts_partial_work
        self._index = {site_name(k): k for k in range(1, experiment.simulation.sites + 1)}

    async def wait_for_sites(self, count: int) -> None:
        if count > len(self._index):
            raise SiteUnavailable("*", f"the simulation has {len(self._index)} sites, the run needs {count}")

    def available(self) -> list[str]:
        return list(self._index)

    def _heterogeneity(self, site: str, instruction: Instruction) -> Instruction:
        sim, seed = self.experiment.simulation, self.experiment.seed
        when = (instruction.round, instruction.attempt)  # a retried round draws afresh
        if sim.dropout and rng(seed, "dropout", *when, site).random() < sim.dropout:
            raise SiteUnavailable(site, "dropped out mid-round (simulated)")
        draw = rng(seed, "straggler", *when, site)
        if sim.stragglers and draw.random() < sim.stragglers:
            if not self.accepts_partial_work:
                raise SiteUnavailable(site, "straggler: did not finish its local epochs (simulated)")
            epochs = int(instruction.config["local_epochs"])
            partial = int(draw.integers(1, epochs)) if epochs > 1 else 1
            return dataclasses.replace(instruction, config={**instruction.config, "local_epochs": partial})
        return instruction

    async def request(self, site: str, instruction: Instruction) -> Reply:
        k = self._index.get(site)
        if k is None:
            raise SiteUnavailable(site, "no such site")
        if instruction.kind is InstructionKind.FIT:
            instruction = self._heterogeneity(site, instruction)
        return await self.runner.run(k, instruction)

    async def finish(self, *, completed: bool, reason: str) -> None:
        self.runner.close()
