"""User-level DP with the noise added by the sites before masking: the distributed discrete
Gaussian (Kairouz, Liu, Steinke, ICML 2021; see fedcore.privacy.distributed). The server
decrypts only a sum that already carries the noise of every site whose masked input is in
it; it never sees an un-noised sum. Its leaf must be a secure sum over 64-bit integers.

A round is accounted with the sites whose noise reached the sum, whether or not the server
keeps it for the model (a decrypted sum is released either way); a sum whose lost noise
would take the run over its target epsilon is never decrypted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedcore.aggregation.base import Aggregate, RoundInfo
from fedcore.aggregation.plans import DistributedNoisePlan, StagePlan
from fedcore.aggregation.private import PrivateStage
from fedcore.privacy import distributed
from fedcore.privacy.distributed import DistributedNoise as Noise
from fedcore.tensors import unflatten

log = logging.getLogger(__name__)


class DistributedNoise(PrivateStage):
    name = "distributed_noise"
    mode = "user-distributed"
    accounting = "distributed discrete Gaussian zCDP (Kairouz et al. 2021), no sampling amplification"

    def __init__(self, config: Any, *, rounds: int, seed: int) -> None:
        super().__init__(config, rounds=rounds, seed=seed)
        self.rhos: list[float] = []

    def noise_multiplier(self) -> float:
        if self.noise is None:
            assert self.config.target_epsilon is not None
            self.noise = distributed.noise_for(
                target_epsilon=self.config.target_epsilon, delta=self.config.delta, rounds=self.rounds
            )
            log.info("noise multiplier %.4f for epsilon %.3g", self.noise, self.config.target_epsilon)
        return self.noise

    def round_noise(self, info: RoundInfo) -> Noise:
        """What each of the round's sampled sites adds, so that their sum has std z x Delta_2."""
        return Noise.for_model(
            dimension=info.dimension,
            clip_norm=self.config.clip_norm,
            noise_multiplier=self.noise_multiplier(),
            sites=len(info.sampled),
        )

    def site_plan(self, info: RoundInfo) -> StagePlan:
        noise = self.round_noise(info)
        return DistributedNoisePlan(
            noise.clip_norm, noise.scale, noise.sigma, self.config.delta, info.run_id, self.config.secure_rng
        )

    def _projected(self, sites: int, info: RoundInfo) -> float:
        rho = distributed.round_rho(
            dimension=info.dimension, noise=self.round_noise(info), sites=max(sites, 1)
        )
        return distributed.epsilon([*self.rhos, rho], self.config.delta)

    def check_round(self, info: RoundInfo) -> None:
        """Best case: every sampled site's noise reaches the sum."""
        if self.config.target_epsilon is not None and info.sampled:
            self.within_target(self._projected(len(info.sampled), info))

    def before_release(self, contributors: int, info: RoundInfo) -> None:
        """Sites that dropped before their masked input took their noise with them."""
        if self.config.target_epsilon is not None:
            try:
                self.within_target(self._projected(contributors, info))
            except Exception:
                log.warning("round %d: not unmasking: %s", info.round, self.stopped)
                raise

    def finish(self, aggregate: Aggregate, info: RoundInfo) -> Aggregate:
        if aggregate.integers is None:
            return aggregate
        # The sum's own site count (its last entry) is a site's claim: the count that matters
        # for the accounting is the leaf's, of masked inputs actually in the sum.
        noise = self.round_noise(info)
        sums, _ = distributed.decode(aggregate.integers, noise)
        # Masked inputs cannot be checked one by one; a sum beyond what `count` clipped updates
        # and their noise can reach (a 10-sigma tail of the noise's norm) proves a lie.
        count, dimension = max(aggregate.count, 1), sums.size
        bound = count * (noise.clip_norm + math.sqrt(dimension) / noise.scale)
        bound += noise.sigma / noise.scale * math.sqrt(count) * (math.sqrt(dimension) + 10)
        if not float(np.linalg.norm(sums)) <= bound:
            aggregate.rejected = (
                f"the decoded sum's norm exceeds {bound:.6g}, what clipped updates and noise reach"
            )
            sums = np.zeros_like(sums)
        aggregate.sum = unflatten(sums / len(info.sampled), info.model)
        aggregate.weight = 1.0  # the fixed denominator (sampled sites) is in the sum already
        return aggregate

    def account_round(self, aggregate: Aggregate, info: RoundInfo) -> None:
        noise = self.round_noise(info)
        rho = distributed.round_rho(dimension=info.dimension, noise=noise, sites=max(aggregate.count, 1))
        self.rhos.append(rho)
        aggregate.measure(
            self.section,
            noise_multiplier=self.noise_multiplier(),
            sites_noise=aggregate.count,
            sigma=noise.sigma,
            rho=rho,
            clip_norm=noise.clip_norm,
        )

    def accountant_name(self) -> str:
        return "zcdp"  # the discrete Gaussian's sum (no PLD of it here)

    def epsilon(self) -> float:
        return distributed.epsilon(self.rhos, self.config.delta)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rhos": self.rhos}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.rhos = [float(r) for r in state["rhos"]]
