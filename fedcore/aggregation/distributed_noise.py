"""User-level DP with the noise added by the sites before masking: the distributed discrete
Gaussian (Kairouz, Liu, Steinke, ICML 2021; see fedcore.privacy.distributed). The server
decrypts only a sum that already carries the noise of every site whose masked input is in
it; it never sees an un-noised sum. Its leaf is a secure sum modulo 2**bits: below 64 bits
the sites rotate their updates and the sum wraps (see fedcore.privacy.distributed).

A round is accounted with the sites whose noise reached the sum, whether or not the server
keeps it for the model (a decrypted sum is released either way); a sum whose lost noise
would take the run over its target epsilon is never decrypted.

The server knows who took part, so no amplification by sampling is claimed; instead each
site is accounted for the rounds its update is in, and only those (a round without it is
independent of its data: the sampling never looks at the data). The stage samples itself:
the round's `sites_per_round` among the sites that have taken part least (ties drawn from the
run's seed), and under a target at most K = ceil(rounds x sites_per_round / sites) times
each, with the noise planned for K rounds; the run's epsilon is the largest site's. With
100 sites, 10 a round, 30 rounds, a site takes part in 3 rounds and epsilon 1 needs a noise
multiplier of 7.0 instead of 22.2 (every site in all 30).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedcore.aggregation.base import Aggregate, RoundInfo, StopRun
from fedcore.aggregation.plans import DistributedNoisePlan, StagePlan
from fedcore.aggregation.private import PrivateStage
from fedcore.errors import ConfigError
from fedcore.privacy import distributed
from fedcore.privacy.distributed import DistributedNoise as Noise
from fedcore.secagg.common import MIN_COHORT
from fedcore.seeding import derive_seed
from fedcore.tensors import unflatten

log = logging.getLogger(__name__)


class DistributedNoise(PrivateStage):
    name = "distributed_noise"
    mode = "user-distributed"
    accounting = (
        "distributed discrete Gaussian zCDP (Kairouz et al. 2021) over each site's own rounds, "
        "no sampling amplification"
    )

    def __init__(
        self,
        config: Any,
        *,
        rounds: int,
        seed: int,
        bits: int,
        sites_per_round: int | None = None,
        min_sites: int = 1,
    ) -> None:
        super().__init__(config, rounds=rounds, seed=seed)
        self.bits = bits
        self.sites_per_round = sites_per_round
        self.min_sites = max(MIN_COHORT, min_sites)  # fewer with budget: no round can complete
        self.participations: int | None = None  # K: the rounds a site may take part in (at round 1)
        self.rhos: dict[str, list[float]] = {}  # site -> rho of each released sum that holds its update
        self.with_budget = 0  # sites that could take part in the last round sampled

    def taken_part(self, site: str) -> int:
        return len(self.rhos.get(site, ()))

    def sample(self, available: Sequence[str], info: RoundInfo) -> list[str]:
        """The sites that have taken part least (under a target: those a full round keeps
        within it, so about K rounds each, fewer for a site whose sums lost others' noise)."""
        if self.participations is None:
            k = self.sites_per_round
            self.participations = self.rounds
            if k is not None and k < len(available):
                self.participations = math.ceil(self.rounds * k / len(available))
        eligible = list(available)
        if self.config.target_epsilon is not None and available:
            full = min(self.sites_per_round or len(available), len(available))
            rho = distributed.round_rho(
                dimension=info.dimension,
                noise=self.round_noise(dataclasses.replace(info, sampled=tuple(available[:full]))),
                sites=full,
            )
            target = self.config.target_epsilon * (1 + 1e-6)
            eligible = [
                s
                for s in available
                if distributed.epsilon([*self.rhos.get(s, []), rho], self.config.delta) <= target
            ]
        self.with_budget = len(eligible)
        tie = np.random.default_rng(derive_seed(self.seed, "distributed-sample", info.round, info.attempt))
        order = sorted(zip(tie.permutation(len(eligible)), eligible, strict=True))
        order.sort(key=lambda pair: self.taken_part(pair[1]))  # stable: ties keep the draw
        return sorted(site for _, site in order[: self.sites_per_round or len(eligible)])

    def vector_length(self, dimension: int) -> int:
        """The integers a site masks for a `dimension`-parameter model: its encoding and count."""
        return distributed.encoded_length(dimension, self.bits) + 1

    def noise_multiplier(self) -> float:
        if self.noise is None:
            assert self.config.target_epsilon is not None
            rounds = self.participations or self.rounds
            self.noise = distributed.noise_for(
                target_epsilon=self.config.target_epsilon, delta=self.config.delta, rounds=rounds
            )
            log.info(
                "noise multiplier %.4f for epsilon %.3g over %d rounds a site",
                self.noise,
                self.config.target_epsilon,
                rounds,
            )
        return self.noise

    def round_noise(self, info: RoundInfo) -> Noise:
        """What each of the round's sampled sites adds, so that their sum has std z x Delta_2
        (and, below 64 bits, the attempt's rotation: public, drawn from its session)."""
        session = f"{info.run_id}/{info.round}/{info.attempt}".encode()
        try:
            return Noise.for_model(
                dimension=info.dimension,
                clip_norm=self.config.clip_norm,
                noise_multiplier=self.noise_multiplier(),
                sites=len(info.sampled),
                bits=self.bits,
                rotation_seed=int.from_bytes(hashlib.sha256(session).digest()[:8], "little"),
            )
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def site_plan(self, info: RoundInfo) -> StagePlan:
        noise = self.round_noise(info)
        return DistributedNoisePlan(
            noise.clip_norm,
            noise.scale,
            noise.sigma,
            self.config.delta,
            info.run_id,
            self.config.secure_rng,
            noise.bits,
            noise.rotation,
        )

    def _projected(self, sites: int, info: RoundInfo) -> float:
        """The largest epsilon of a sampled site if a sum of `sites` sites' noise holds it."""
        rho = distributed.round_rho(
            dimension=info.dimension, noise=self.round_noise(info), sites=max(sites, 1)
        )
        return max(distributed.epsilon([*self.rhos.get(s, []), rho], self.config.delta) for s in info.sampled)

    def check_round(self, info: RoundInfo) -> None:
        """Best case: every sampled site's noise reaches the sum."""
        if self.config.target_epsilon is None:
            return
        if self.with_budget < self.min_sites:
            self.stopped = (
                f"{self.with_budget} site(s) have rounds left within the target epsilon "
                f"{self.config.target_epsilon:g} (each takes part in about {self.participations}); "
                f"a round needs {self.min_sites}: the run ends at epsilon {self.epsilon():.4g}"
            )
            raise StopRun(self.stopped)
        if info.sampled:
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
        sums, _ = distributed.decode(aggregate.integers, noise, info.dimension)
        # Masked inputs cannot be checked one by one; a sum beyond what `count` clipped updates
        # and their noise can reach (a 10-sigma tail of the noise's norm) proves a lie.
        # Rounding moves each of the padded coordinates; the noise, rotated back and cut, lies
        # in the model's own d.
        count, dimension = max(aggregate.count, 1), sums.size
        bound = count * (noise.clip_norm + math.sqrt(noise.length(dimension)) / noise.scale)
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
        for site in aggregate.contributors:
            self.rhos.setdefault(site, []).append(rho)
        aggregate.measure(
            self.section,
            noise_multiplier=self.noise_multiplier(),
            sites_noise=aggregate.count,
            sigma=noise.sigma,
            scale=noise.scale,
            bits=noise.bits,
            rho=rho,
            clip_norm=noise.clip_norm,
        )

    def accountant_name(self) -> str:
        return "zcdp"  # the discrete Gaussian's sum (no PLD of it here)

    def epsilon(self) -> float:
        """The largest site's: each site composes the rounds its update is in."""
        return max((distributed.epsilon(r, self.config.delta) for r in self.rhos.values()), default=0.0)

    def summary_details(self) -> dict[str, Any]:
        taken = [len(r) for r in self.rhos.values()]
        return {"rounds_per_site": self.participations, "most_rounds_taken": max(taken, default=0)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rhos": self.rhos, "participations": self.participations}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if not isinstance(state["rhos"], Mapping):
            raise ConfigError(
                "this run's state is from an older fedcore that accounted distributed DP per round, "
                "not per site: it cannot be resumed by this version; start a new run"
            )
        self.rhos = {site: [float(r) for r in rhos] for site, rhos in state["rhos"].items()}
        self.participations = state["participations"]
