"""User-level DP with the noise added at the server: DP-FedAvg (McMahan et al., ICLR 2018)
with optional adaptive clipping (Andrew et al., NeurIPS 2021).

It wraps a `Clip` stage with equal weights: the sum of clipped updates gets discrete Gaussian
noise of multiplier z on an integer grid (`grid_noised`: no floating-point noise is released)
and is divided by the expected number of sites (a fixed denominator: the actual
count would depend on who took part). Sites are Poisson-sampled with rate q from the DP
stream, once per round (a retry keeps the sample), and the round completes with whoever
replied (none: the noise alone is released), so each round is exactly the subsampled
Gaussian `Mechanism(z, q, 1)` the RDP accountant composes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedcore.aggregation.base import Aggregate, RoundInfo
from fedcore.aggregation.clip import UNCLIPPED, Clip
from fedcore.aggregation.plans import CentralNoisePlan, StagePlan
from fedcore.aggregation.private import PrivateStage
from fedcore.config import PrivacyConfig
from fedcore.privacy import accountant
from fedcore.privacy.accountant import Mechanism
from fedcore.privacy.user_level import AdaptiveClip, grid_noised, update_noise_multiplier

log = logging.getLogger(__name__)


class CentralNoise(PrivateStage):
    name = "central_noise"
    mode = "user-central"
    accounting = "the Gaussian mechanism on the clipped sum, Poisson site sampling, over rounds"
    completes_any_sample = True

    def __init__(
        self, config: PrivacyConfig, *, clip: Clip, rounds: int, sites_per_round: int | None, seed: int
    ) -> None:
        super().__init__(config, rounds=rounds, seed=seed)
        self.clip = clip
        self.sites_per_round = sites_per_round
        self.history: list[Mechanism] = []
        self.adaptive = (
            AdaptiveClip(
                initial=clip.norm,
                target_quantile=config.target_quantile,
                learning_rate=config.clip_learning_rate,
                count_stddev=config.clipped_count_stddev,
            )
            if config.adaptive_clipping
            else None
        )
        self.sample_round = 0  # the round whose Poisson sample is kept
        self.sampled: list[str] = []
        self.sampled_from = 0  # how many sites it was drawn from

    def rate(self) -> float:
        k = self.sites_per_round
        return 1.0 if k is None or k >= self.sampled_from else k / self.sampled_from

    def noise_multiplier(self) -> float:
        """The job's z: fixed, or calibrated from target_epsilon the first time it is needed."""
        if self.noise is None:
            assert self.config.target_epsilon is not None
            self.noise = accountant.noise_for(
                target_epsilon=self.config.target_epsilon,
                delta=self.config.delta,
                sample_rate=self.rate(),
                steps=self.rounds,
                accountant=self.config.accountant,
                adjacency=self.config.neighbours,
            )
            log.info(
                "noise multiplier %.4f for epsilon %.3g over %d rounds",
                self.noise,
                self.config.target_epsilon,
                self.rounds,
            )
        return self.noise

    def sample(self, available: Sequence[str], info: RoundInfo) -> list[str]:
        """Each site independently with probability q (what the amplification by sampling
        assumes), once per round: a retried attempt keeps it."""
        if self.sample_round != info.round:
            self.sampled_from = len(available)
            q = self.rate()
            random = self.random(info, "sample")
            chosen = random.bernoulli(len(available), q) if q < 1 else np.ones(len(available), bool)
            self.sampled = [s for s, c in zip(available, chosen, strict=True) if c]
            self.sample_round = info.round
        return list(self.sampled)

    def check_round(self, info: RoundInfo) -> None:
        if self.config.target_epsilon is not None:
            next_round = Mechanism(self.noise_multiplier(), self.rate(), 1)
            self.within_target(self.history_epsilon([*self.history, next_round]))

    def site_plan(self, info: RoundInfo) -> StagePlan:
        return CentralNoisePlan(self.config.delta, info.run_id)

    def _update_noise(self) -> float:
        """The update's share of z (all of it, unless adaptive clipping takes a share)."""
        z = self.noise_multiplier()
        if self.adaptive is None:
            return z
        if self.adaptive.count_stddev is None:
            # Andrew et al. suggest expected sites / 20; in small federations that would leave
            # the update no share of the noise, so never below z (update noise x1.15).
            self.adaptive.count_stddev = max(self.rate() * self.sampled_from / 20, z)
        return update_noise_multiplier(z, self.adaptive.count_stddev)

    def finish(self, aggregate: Aggregate, info: RoundInfo) -> Aggregate:
        sums = aggregate.sum if aggregate.sum is not None else {}
        names = list(info.model)
        flat = np.concatenate([np.ravel(sums.get(k, np.zeros(info.model[k].shape))) for k in names])
        released, step = grid_noised(
            flat,
            noise_multiplier=self._update_noise(),
            clip=self.clip.norm,
            random=self.random(info, "noise"),
        )
        noisy, offset = {}, 0
        for k in names:
            size = info.model[k].size
            noisy[k] = released[offset : offset + size].reshape(info.model[k].shape)
            offset += size
        aggregate.sum = noisy
        aggregate.measure(self.section, grid_step=step)
        aggregate.weight = self.rate() * self.sampled_from
        return aggregate

    def account_round(self, aggregate: Aggregate, info: RoundInfo) -> None:
        z, q = self.noise_multiplier(), self.rate()
        self.history.append(Mechanism(z, q, 1))
        aggregate.measure(self.section, noise_multiplier=z, sample_rate=q, clip_norm=self.clip.norm)
        if self.adaptive is not None:
            unclipped = sum(
                int(aggregate.site_metrics.get(s, {}).get(UNCLIPPED, 0.0) >= 0.5)
                for s in aggregate.contributors
            )
            fraction = self.adaptive.update(
                unclipped, aggregate.count, q * self.sampled_from, self.random(info, "adaptive")
            )
            self.clip.norm = self.adaptive.clip_norm
            aggregate.measure(self.section, unclipped_fraction=fraction, next_clip_norm=self.clip.norm)

    def mechanisms(self) -> list[Mechanism]:
        return list(self.history)

    def epsilon(self) -> float:
        return self.history_epsilon(self.history)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "history": [[m.noise_multiplier, m.sample_rate, m.steps] for m in self.history],
            "count_stddev": self.adaptive.count_stddev if self.adaptive else None,
            "clip_norm": self.clip.norm,
            "sample": [self.sample_round, self.sampled, self.sampled_from],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.history = [Mechanism(float(z), float(q), int(n)) for z, q, n in state["history"]]
        self.clip.norm = float(state["clip_norm"])  # the clip stage adapts with it
        if self.adaptive is not None:
            self.adaptive.clip_norm = self.clip.norm
            self.adaptive.count_stddev = state["count_stddev"]
        self.sample_round, self.sampled, self.sampled_from = state["sample"]
