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

from fedcore.config import DEFAULT_COLLUDING_FRACTION, Accountant, Adjacency
from fedcore.errors import PrivacyBudgetError
from fedcore.privacy import distributed
from fedcore.privacy.accountant import Mechanism, epsilon, noise_for
from fedcore.privacy.distributed import DistributedNoise, sensitivity_l2
from fedcore.privacy.dpsgd import SampleDP
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
    # The fewest sites whose sum this site's masked update may enter: a server colluding with
    # sites can make every other input of a cohort its own, so a larger minimum is what keeps
    # honest inputs beside this site's (3, the protocol's own floor, by default).
    min_secure_cohort: int = 3
    # The share of a secure sum's participants this site assumes may collude with the server:
    # it refuses a threshold that does not hold against that many (fedcore.secagg.graph).
    colluding_fraction: float = DEFAULT_COLLUDING_FRACTION
    accountant: Accountant = Accountant.PLD  # what the budget is checked with
    ledger: Path | None = None  # None: in memory (a simulated site)


@dataclass(frozen=True)
class RoundPlan:
    mechanism: Mechanism  # what the round costs this site, by its own accounting
    run: str
    job_delta: float
    dp: SampleDP | None = None  # sample-level: the DP-SGD to run
    accountant: Accountant = Accountant.PLD  # the job's, for this run's epsilon
    adjacency: Adjacency = Adjacency.ADD_REMOVE  # the job's, for this run's epsilon
    distributed: DistributedNoise | None = None  # user-distributed: the noise to add


class SitePrivacy:
    def __init__(self, policy: SitePolicy | None = None) -> None:
        self.policy = policy or SitePolicy()
        self.ledger = PrivacyLedger(
            self.policy.ledger, delta=self.policy.delta, accountant=self.policy.accountant
        )

    @property
    def protective(self) -> bool:
        """The site has a policy beyond accounting: it only spends privacy it can account."""
        return self.policy.require_dp or self.policy.max_epsilon is not None

    def refuse_unaccounted(self, what: str) -> None:
        """A round whose privacy the site cannot account itself (no DP, or central DP)."""
        if self.protective:
            raise PrivacyBudgetError(
                f"privacy policy: this site only takes part with noise it adds and accounts itself "
                f"(sample or user-distributed DP); the job asks for {what}"
            )

    def plan_dp_sgd(
        self,
        *,
        noise_multiplier: float | None,
        target_epsilon: float | None,
        rounds: int,
        max_grad_norm: float,
        sample_rate: float,
        local_steps: int,
        ghost_clipping: bool,
        delta: float,
        run: str,
        statistics_noise: float | None = None,
        accountant: str = Accountant.PLD.value,
        adjacency: str = Adjacency.ADD_REMOVE.value,
        expected_batch: float = 100.0,
    ) -> RoundPlan:
        """What a DP-SGD round will cost the site; PrivacyBudgetError when its policy forbids
        it, or when the round would take this run past the job's target epsilon by the
        site's own ledger (a retried round counts again: whatever the server asks, the run
        never ends above its target). `statistics_noise`: the run also releases statistics
        with this noise (a target epsilon is met with that release composed in)."""
        job_delta = _delta(delta)
        job_accountant = _accountant(accountant)
        neighbours = _adjacency(adjacency)
        sample_rate = job_setting("sample_rate", sample_rate)
        if (
            not sample_rate <= 1
            or not isinstance(local_steps, int)
            or not 1 <= local_steps <= MAX_LOCAL_STEPS
        ):
            raise PrivacyBudgetError(
                f"privacy policy: bad DP-SGD settings q={sample_rate}, steps={local_steps}"
            )
        prior = statistics_release(statistics_noise)
        if target_epsilon is not None:
            target = job_setting("target_epsilon", target_epsilon)
            noise = planned_noise(
                target, job_delta, sample_rate, local_steps, rounds, prior, job_accountant, neighbours
            )
        else:
            noise = job_setting("noise_multiplier", noise_multiplier)
        if noise < self.policy.min_noise_multiplier:
            log.info(
                "raising the job's noise multiplier %.3f to the site's floor %.3f",
                noise,
                self.policy.min_noise_multiplier,
            )
            noise = self.policy.min_noise_multiplier
        dp = SampleDP(
            noise,
            job_setting("max_grad_norm", max_grad_norm),
            sample_rate,
            local_steps,
            job_setting("expected_batch", expected_batch),
            ghost_clipping,
        )
        if target_epsilon is not None:
            self.ledger.reload()
            # The ledger holds this run's statistics release already, if this site made it.
            spent = [*self.ledger.runs.get(run, []), dp.mechanism]
            after = epsilon(spent, job_delta, job_accountant, neighbours)
            if after > target * (1 + TARGET_SLACK):
                raise PrivacyBudgetError(
                    f"privacy policy: this round would take the run's epsilon to {after:.4g} "
                    f"(delta {job_delta:g}), over the job's target {target:g}"
                )
        plan = RoundPlan(dp.mechanism, run, job_delta, dp=dp, accountant=job_accountant, adjacency=neighbours)
        return self._affordable(plan)

    def plan_distributed(
        self, noise: DistributedNoise, *, delta: float, run: str, dimension: int, participants: int | None
    ) -> RoundPlan:
        """What adding this distributed noise costs the site (`participants`: the fewest sites
        whose sum the round's secure aggregation can unmask, its threshold; None without
        one); PrivacyBudgetError when forbidden."""
        if participants is None:
            # Without masking, the server would see this site's update with its share of noise only.
            raise PrivacyBudgetError(
                "privacy policy: user-distributed DP needs secure aggregation in this round"
            )
        for name, value in (("clip_norm", noise.clip_norm), ("scale", noise.scale), ("sigma", noise.sigma)):
            job_setting(name, value)
        # Integers the encoding and the sampler make exactly: far beyond, floats lose the noise's
        # low bits (a server could then tell updates apart from one round at any ledger charge).
        largest = distributed.largest_integer(noise.bits)
        if not (noise.clip_norm * noise.scale <= largest and noise.sigma <= largest):
            raise PrivacyBudgetError(
                f"privacy policy: the job's distributed noise asks for integers beyond {largest:.3g} "
                f"(scale x clip {noise.clip_norm * noise.scale:.3g}, sigma {noise.sigma:.3g})"
            )
        own = self.check_noise_floor(noise, dimension=dimension, participants=participants)
        # The site's own noise alone, against a server that could drop every other site: a
        # single discrete Gaussian is exactly the Gaussian mechanism's zCDP (tau = 0 for one site).
        # The ledger's unit is one example: adding or removing one can move the clipped update
        # anywhere in its ball, twice the clip norm, so the multiplier per example is half the
        # one per site (whose neighbour is its update zeroed).
        return self._affordable(RoundPlan(Mechanism(own / 2, 1.0, 1), run, _delta(delta), distributed=noise))

    def plan_statistics(self, *, noise_multiplier: float, delta: float, run: str) -> RoundPlan:
        """What releasing a statistics vector with Gaussian noise (`noise_multiplier` x its
        per-record sensitivity, at least the site's floor) costs: one Gaussian mechanism."""
        noise = max(job_setting("noise_multiplier", noise_multiplier), self.policy.min_noise_multiplier)
        return self._affordable(RoundPlan(Mechanism(noise, 1.0, 1), run, _delta(delta)))

    def check_noise_floor(self, noise: DistributedNoise, *, dimension: int, participants: int) -> float:
        """The site's own noise multiplier; PrivacyBudgetError when a secure sum of
        `participants` such sites would carry less noise than the site's floor. (Against a
        server that drops sites on purpose the floor is only as good as the threshold; the
        ledger charges the site's own noise alone, which holds whatever the server does.)"""
        own = noise.sigma / sensitivity_l2(noise.length(dimension), noise.clip_norm, noise.scale)
        if own * math.sqrt(participants) < self.policy.min_noise_multiplier:
            raise PrivacyBudgetError(
                f"privacy policy: the round's summed noise multiplier {own * math.sqrt(participants):.3f} is below "
                f"this site's floor {self.policy.min_noise_multiplier}"
            )
        return own

    def _affordable(self, plan: RoundPlan) -> RoundPlan:
        self.ledger.reload()  # another process may share the ledger
        self._check_budget(plan.mechanism)
        return plan

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
            "epsilon": epsilon(self.ledger.runs[plan.run], plan.job_delta, plan.accountant, plan.adjacency),
            "epsilon_total": self.ledger.spent(),
            "noise_multiplier": plan.mechanism.noise_multiplier,
        }


TARGET_SLACK = 1e-6  # relative: the noise search's own precision is coarser
MAX_LOCAL_STEPS = 100_000  # DP-SGD steps a site runs in one round at most, whatever the job asks


def statistics_release(noise: float | None) -> tuple[Mechanism, ...]:
    """The statistics release before round 1, as a mechanism (none when the task has none)."""
    return (Mechanism(job_setting("statistics_noise", noise), 1.0, 1),) if noise else ()


def planned_noise(
    target: float,
    delta: float,
    sample_rate: float,
    local_steps: int,
    rounds: int,
    prior: tuple[Mechanism, ...],
    accountant: Accountant,
    adjacency: Adjacency = Adjacency.ADD_REMOVE,
) -> float:
    """The DP-SGD noise multiplier every site of a run uses for a target epsilon: the same
    at the server (which accounts every site from it) and at each site (which refuses to
    go past it)."""
    if rounds < 1:
        raise PrivacyBudgetError("privacy policy: a target epsilon needs the job's number of rounds")
    return noise_for(
        target_epsilon=target,
        delta=delta,
        sample_rate=sample_rate,
        steps=local_steps * rounds,
        prior=prior,
        accountant=accountant,
        adjacency=adjacency,
    )


def _adjacency(name: object) -> Adjacency:
    try:
        relation = Adjacency(str(name))
    except ValueError:
        relation = None
    if relation not in (Adjacency.ADD_REMOVE, Adjacency.REPLACE_ONE):
        raise PrivacyBudgetError(
            f"privacy policy: DP-SGD's neighbours are add-remove or replace-one, not {name!r}"
        )
    return relation


def _accountant(name: object) -> Accountant:
    try:
        return Accountant(str(name))
    except ValueError:
        raise PrivacyBudgetError(f"privacy policy: unknown accountant {name!r}") from None


def job_setting(name: str, value: object) -> float:
    """A positive, finite number the job sends; PrivacyBudgetError (a refusal) otherwise."""
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not value > 0
    ):
        raise PrivacyBudgetError(f"privacy policy: the job's {name} must be a positive number, got {value!r}")
    return float(value)


def _delta(value: float) -> float:
    value = job_setting("delta", value)
    if not value < 1:
        raise PrivacyBudgetError(f"privacy policy: the job's delta must be in (0, 1), got {value}")
    return value
