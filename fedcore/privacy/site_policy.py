"""A site's own privacy policy and its enforcement before every round.

The job (the server's `[privacy]`) asks for a mode and a noise level; the site's policy
(`site.toml` `[privacy]`) can only make that stricter: a floor on the noise multiplier, a
total budget `max_epsilon` at its own `delta`, and whether it takes part without DP-SGD at
all. Before training, the site computes what the round would cost from its own example
count, batch size and epochs, adds it to its ledger's history and refuses the round if the
total would cross the budget. After training, and before the update leaves, the round is
written to the ledger.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcore.errors import PrivacyBudgetError
from fedcore.privacy.accountant import Mechanism, noise_for
from fedcore.privacy.dpsgd import SampleDP, round_mechanism
from fedcore.privacy.ledger import PrivacyLedger

log = logging.getLogger(__name__)

DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class SitePolicy:
    max_epsilon: float | None = None  # total over every run, at `delta`; None: account, never refuse
    delta: float = DEFAULT_DELTA
    min_noise_multiplier: float = 0.0  # DP-SGD noise never below this, whatever the job asks
    require_dp: bool = False  # refuse rounds that do not protect the site's data with noise it adds
    allow_insecure_rng: bool = False  # honour a job's secure_rng = false (simulated sites only)
    ledger: Path | None = None  # None: in memory (a simulated site)


@dataclass(frozen=True)
class RoundPlan:
    dp: SampleDP
    mechanism: Mechanism
    run: str
    job_delta: float


class SitePrivacy:
    def __init__(self, policy: SitePolicy | None = None) -> None:
        self.policy = policy or SitePolicy()
        self.ledger = PrivacyLedger(self.policy.ledger, delta=self.policy.delta)

    def plan(
        self, config: dict[str, Any], *, examples: int, batch_size: int, local_epochs: int
    ) -> RoundPlan | None:
        """The DP-SGD this round will run (None: none asked for); PrivacyBudgetError when the
        site's policy forbids the round."""
        mode = str(config.get("dp_mode", "none"))
        if mode != "sample":
            if self.policy.require_dp and mode != "user-distributed":
                raise PrivacyBudgetError(
                    f"privacy policy: this site requires DP noise it adds itself, the job asks for {mode!r}"
                )
            return None
        job_delta = float(config["dp_delta"])
        steps_per_epoch = round_mechanism(
            examples, batch_size=batch_size, local_epochs=1, noise_multiplier=1.0
        )
        if "dp_target_epsilon" in config:
            noise = noise_for(
                target_epsilon=float(config["dp_target_epsilon"]),
                delta=job_delta,
                sample_rate=steps_per_epoch.sample_rate,
                steps=steps_per_epoch.steps * local_epochs * int(config["dp_rounds"]),
            )
        else:
            noise = float(config["dp_noise_multiplier"])
        if noise < self.policy.min_noise_multiplier:
            log.info(
                "raising the job's noise multiplier %.3f to the site's floor %.3f",
                noise,
                self.policy.min_noise_multiplier,
            )
            noise = self.policy.min_noise_multiplier
        mechanism = round_mechanism(
            examples, batch_size=batch_size, local_epochs=local_epochs, noise_multiplier=noise
        )
        if self.policy.max_epsilon is not None:
            after = self.ledger.spent_after(mechanism)
            if after > self.policy.max_epsilon:
                raise PrivacyBudgetError(
                    f"privacy budget: this round would bring the site's epsilon to {after:.3f} > "
                    f"max_epsilon {self.policy.max_epsilon} (delta {self.policy.delta}); "
                    f"spent so far {self.ledger.spent():.3f}"
                )
        dp = SampleDP(noise, float(config["dp_max_grad_norm"]), bool(config.get("dp_ghost", False)))
        return RoundPlan(dp, mechanism, str(config["dp_run"]), job_delta)

    def secure_rng(self, asked: bool) -> bool:
        """Whether DP noise comes from the OS's secure source: a real site insists, whatever
        the job says (a predictable stream would let the server subtract the noise)."""
        if not asked and not self.policy.allow_insecure_rng:
            log.warning("the job asks for reproducible DP noise; this site uses secure randomness")
            return True
        return asked

    def spend(self, plan: RoundPlan) -> dict[str, float]:
        """Write the round to the ledger; the epsilons to report (this run at the job's delta,
        every run at the site's)."""
        self.ledger.record(plan.run, plan.mechanism)
        from fedcore.privacy.accountant import epsilon

        return {
            "epsilon": epsilon(self.ledger.runs[plan.run], plan.job_delta),
            "epsilon_total": self.ledger.spent(),
            "noise_multiplier": plan.dp.noise_multiplier,
        }
