"""Sample-level DP: every site trains with DP-SGD and accounts for itself (its ledger and
budget); the server only relays the job's settings and collects each site's reported
epsilon. The run's epsilon is the largest a site reported."""

from __future__ import annotations

from typing import Any

from fedcore.aggregation.base import RoundInfo
from fedcore.aggregation.plans import SampleDPPlan, StagePlan
from fedcore.aggregation.private import PrivateStage
from fedcore.config import PrivacyConfig


class SampleLevelDP(PrivateStage):
    name = "sample_dp"
    mode = "sample"
    unit = "one training example"
    accountant = "each site's RDP accountant (Opacus) over its DP-SGD steps"

    def __init__(
        self, config: PrivacyConfig, *, rounds: int, seed: int, releases_statistics: bool = False
    ) -> None:
        super().__init__(config, rounds=rounds, seed=seed)
        self.statistics_noise = config.statistics_noise_multiplier if releases_statistics else None

    def site_plan(self, info: RoundInfo) -> StagePlan:
        p = self.config
        return SampleDPPlan(
            max_grad_norm=p.max_grad_norm,
            rounds=self.rounds,
            delta=p.delta,
            run=info.run_id,
            noise_multiplier=p.noise_multiplier,
            target_epsilon=p.target_epsilon,
            ghost_clipping=p.ghost_clipping,
            secure_rng=p.secure_rng,
            statistics_noise=self.statistics_noise,
        )

    # check_round: nothing. Each site enforces its own budget and the job's target by refusing.

    def epsilon(self) -> float:
        return max(self.site_epsilon.values(), default=0.0)

    def summary_details(self) -> dict[str, Any]:
        return {"noise_multiplier": self.config.noise_multiplier}
