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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcore.errors import PrivacyBudgetError
from fedcore.privacy.accountant import Mechanism, epsilon, noise_for
from fedcore.privacy.distributed import DistributedNoise, sensitivity_l2
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
    mechanism: Mechanism  # what the round costs this site, by its own accounting
    run: str
    job_delta: float
    dp: SampleDP | None = None  # sample-level: the DP-SGD to run
    distributed: DistributedNoise | None = None  # user-distributed: the noise to add


class SitePrivacy:
    def __init__(self, policy: SitePolicy | None = None) -> None:
        self.policy = policy or SitePolicy()
        self.ledger = PrivacyLedger(self.policy.ledger, delta=self.policy.delta)

    @property
    def protective(self) -> bool:
        """The site has a policy beyond accounting: it only spends privacy it can account."""
        return self.policy.require_dp or self.policy.max_epsilon is not None

    def plan(
        self,
        config: dict[str, Any],
        *,
        examples: int,
        batch_size: int,
        local_epochs: int,
        dimension: int,
        secure_participants: int | None,
    ) -> RoundPlan | None:
        """What this round will cost the site (None: no DP asked for and none required);
        PrivacyBudgetError when the site's policy forbids the round. `secure_participants`
        is the number of sites in the round's secure aggregation (None: no secure aggregation)."""
        mode = str(config.get("dp_mode", "none"))
        if mode == "sample":
            plan = self._plan_dp_sgd(
                config, examples=examples, batch_size=batch_size, local_epochs=local_epochs
            )
        elif mode == "user-distributed":
            plan = self._plan_distributed(config, dimension=dimension, participants=secure_participants)
        else:
            if self.protective:
                # Central or no DP: the site cannot account what its data costs.
                raise PrivacyBudgetError(
                    f"privacy policy: this site only takes part with noise it adds and accounts itself "
                    f"(sample or user-distributed DP); the job asks for {mode!r}"
                )
            return None
        self.ledger.reload()  # another process may share the ledger
        self._check_budget(plan.mechanism)
        return plan

    def _plan_dp_sgd(
        self, config: dict[str, Any], *, examples: int, batch_size: int, local_epochs: int
    ) -> RoundPlan:
        job_delta = _delta(config)
        steps_per_epoch = round_mechanism(
            examples, batch_size=batch_size, local_epochs=1, noise_multiplier=1.0
        )
        if "dp_target_epsilon" in config:
            noise = noise_for(
                target_epsilon=job_setting(config, "dp_target_epsilon"),
                delta=job_delta,
                sample_rate=steps_per_epoch.sample_rate,
                steps=steps_per_epoch.steps * local_epochs * int(job_setting(config, "dp_rounds")),
            )
        else:
            noise = job_setting(config, "dp_noise_multiplier")
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
        dp = SampleDP(noise, job_setting(config, "dp_max_grad_norm"), bool(config.get("dp_ghost", False)))
        return RoundPlan(mechanism, str(config["dp_run"]), job_delta, dp=dp)

    def _plan_distributed(
        self, config: dict[str, Any], *, dimension: int, participants: int | None
    ) -> RoundPlan:
        if participants is None:
            # Without masking, the server would see this site's update with its share of noise only.
            raise PrivacyBudgetError(
                "privacy policy: user-distributed DP needs secure aggregation in this round"
            )
        noise = DistributedNoise(
            job_setting(config, "dp_clip_norm"),
            job_setting(config, "dp_scale"),
            job_setting(config, "dp_sigma"),
        )
        own = noise.sigma / sensitivity_l2(dimension, noise.clip_norm, noise.scale)
        if own * math.sqrt(participants) < self.policy.min_noise_multiplier:
            raise PrivacyBudgetError(
                f"privacy policy: the round's summed noise multiplier {own * math.sqrt(participants):.3f} is below "
                f"this site's floor {self.policy.min_noise_multiplier}"
            )
        # The site's own noise alone, against a server that could drop every other site: a
        # single discrete Gaussian is exactly the Gaussian mechanism's zCDP (tau = 0 for one site).
        return RoundPlan(Mechanism(own, 1.0, 1), str(config["dp_run"]), _delta(config), distributed=noise)

    def _check_budget(self, mechanism: Mechanism) -> None:
        if self.policy.max_epsilon is None:
            return
        after = self.ledger.spent_after(mechanism)
        if after > self.policy.max_epsilon:
            raise PrivacyBudgetError(
                f"privacy budget: this round would bring the site's epsilon to {after:.3f} > "
                f"max_epsilon {self.policy.max_epsilon} (delta {self.policy.delta}); "
                f"spent so far {self.ledger.spent():.3f}"
            )

    def secure_rng(self, asked: bool) -> bool:
        """Whether DP noise comes from the OS's secure source: a real site insists, whatever
        the job says (a predictable stream would let the server subtract the noise)."""
        if not asked and not self.policy.allow_insecure_rng:
            log.warning("the job asks for reproducible DP noise; this site uses secure randomness")
            return True
        return asked

    def spend(self, plan: RoundPlan) -> dict[str, float]:
        """Write the round to the ledger before its update leaves; the epsilons to report
        (this run at the job's delta, every run at the site's). Checked again under the
        ledger's lock: a process sharing the ledger may have spent in the meantime."""
        with self.ledger.locked():
            self._check_budget(plan.mechanism)
            self.ledger.record(plan.run, plan.mechanism)
        return {
            "epsilon": epsilon(self.ledger.runs[plan.run], plan.job_delta),
            "epsilon_total": self.ledger.spent(),
            "noise_multiplier": plan.mechanism.noise_multiplier,
        }


def job_setting(config: dict[str, Any], key: str) -> float:
    """A positive, finite number the job sends; PrivacyBudgetError (a refusal) otherwise."""
    value = config.get(key)
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not value > 0
    ):
        raise PrivacyBudgetError(
            f"privacy policy: the job's {key!r} must be a positive number, got {value!r}"
        )
    return float(value)


def _delta(config: dict[str, Any]) -> float:
    value = job_setting(config, "dp_delta")
    if not value < 1:
        raise PrivacyBudgetError(f"privacy policy: the job's delta must be in (0, 1), got {value}")
    return value
