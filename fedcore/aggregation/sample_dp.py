"""Sample-level DP: every site trains with DP-SGD and accounts for itself (its ledger and
budget). The DP-SGD mechanism of a round (noise, sampling rate, steps) is public and the
same at every site, so the server accounts every site too, from the attempts it sent each
one: a retried round counts again, and no attempt starts that could take a site past the
run's target epsilon (the sites refuse one by their own ledgers as well). The run's epsilon
is the largest site's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedcore.aggregation.base import RoundInfo
from fedcore.aggregation.plans import SampleDPPlan, StagePlan
from fedcore.aggregation.private import PrivateStage
from fedcore.config import PrivacyConfig, Unit
from fedcore.privacy.accountant import Mechanism
from fedcore.privacy.site_policy import planned_noise, statistics_release


class SampleLevelDP(PrivateStage):
    name = "sample_dp"
    mode = "sample"
    unit = Unit.EXAMPLE
    accounting = "every site's DP-SGD steps, from the attempts the server sent it"

    def __init__(
        self, config: PrivacyConfig, *, rounds: int, seed: int, releases_statistics: bool = False
    ) -> None:
        super().__init__(config, rounds=rounds, seed=seed)
        self.statistics_noise = config.statistics_noise_multiplier if releases_statistics else None
        self.prior = statistics_release(self.statistics_noise)  # what the noise is planned with: one
        self.statistics_releases = 0  # what the sites paid: one per statistics attempt released
        if config.target_epsilon is not None:
            self.noise = planned_noise(
                config.target_epsilon,
                config.delta,
                config.sample_rate,
                config.local_steps,
                rounds,
                self.prior,
                config.accountant,
                config.neighbours,
            )
        self.trained: dict[str, int] = {}  # site -> attempts it was sent to train in (so: may have)

    def mechanism(self) -> Mechanism:
        assert self.noise is not None
        return Mechanism(self.noise, self.config.sample_rate, self.config.local_steps)

    def site_history(self, attempts: int) -> list[Mechanism]:
        """What a site has spent in this run after training in `attempts` attempts: the
        statistics releases it may have paid for (at least the planned one), then its rounds."""
        if attempts == 0:
            return []
        return [*self.prior * max(self.statistics_releases, 1), *[self.mechanism()] * attempts]

    def statistics_released(self) -> None:
        self.statistics_releases += 1

    def check_round(self, info: RoundInfo) -> None:
        most = max((self.trained.get(s, 0) for s in info.sampled), default=0)
        self.within_target(self.history_epsilon(self.site_history(most + 1)))
        for site in info.sampled:  # counted before any instruction leaves: whether it trains or not
            self.trained[site] = self.trained.get(site, 0) + 1

    def site_plan(self, info: RoundInfo) -> StagePlan:
        p = self.config
        return SampleDPPlan(
            max_grad_norm=p.max_grad_norm,
            rounds=self.rounds,
            delta=p.delta,
            run=info.run_id,
            sample_rate=p.sample_rate,
            local_steps=p.local_steps,
            noise_multiplier=p.noise_multiplier,
            target_epsilon=p.target_epsilon,
            accountant=p.accountant.value,
            adjacency=p.neighbours.value,
            expected_batch=p.expected_batch,
            ghost_clipping=p.ghost_clipping,
            secure_rng=p.secure_rng,
            statistics_noise=self.statistics_noise,
        )

    def mechanisms(self) -> list[Mechanism]:
        return self.site_history(max(self.trained.values(), default=0))

    def epsilon(self) -> float:
        return self.history_epsilon(self.mechanisms())

    def summary_details(self) -> dict[str, Any]:
        p = self.config
        return {
            "sample_rate": p.sample_rate,
            "local_steps": p.local_steps,
            "expected_batch": p.expected_batch,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "trained": dict(self.trained), "statistics": self.statistics_releases}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.trained = {k: int(v) for k, v in state.get("trained", {}).items()}
        self.statistics_releases = int(state.get("statistics", 0))
