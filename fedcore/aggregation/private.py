"""What the three differential-privacy stages share: the run's target epsilon (never
exceeded: a round that could cross it does not start, and the run ends saying why), the
sites' refusals on privacy grounds, and the privacy summary of the run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from fedcore.aggregation.base import Aggregate, RefusalCode, RoundInfo, Section, Stage, StopRun
from fedcore.config import Accountant, Adjacency, PrivacyConfig, Unit
from fedcore.privacy import accountant
from fedcore.privacy.accountant import Mechanism
from fedcore.privacy.randomness import SecureRandom, dp_random
from fedcore.seeding import derive_seed

EPSILON, EPSILON_TOTAL, NOISE = "epsilon", "epsilon_total", "noise_multiplier"  # what a site reports


class PrivateStage(Stage):
    section = Section.PRIVACY
    withholds_evaluation = "differential privacy"
    accounts_privacy = True
    mode: ClassVar[str]
    unit: ClassVar[Unit] = Unit.SITE
    accounting: ClassVar[str]  # what the accountant composes, in words
    reserved_metrics = frozenset({EPSILON, EPSILON_TOTAL, NOISE})

    def __init__(self, config: PrivacyConfig, *, rounds: int, seed: int) -> None:
        self.config = config
        self.rounds = rounds
        self.seed = seed
        self.noise: float | None = config.noise_multiplier  # from target_epsilon when first needed
        self.stopped: str | None = None
        self.refused = 0
        self.site_epsilon: dict[str, float] = {}  # each site's epsilon for this run, as it reported
        self.site_noise: dict[str, float] = {}  # each site's own noise multiplier, as it reported

    def random(self, info: RoundInfo, purpose: str) -> SecureRandom:
        """Noise and sampling: the OS's secure source, or (secure_rng = false, tests only) a
        stream seeded per round and attempt, so that a resumed run draws what it would have."""
        return dp_random(
            secure=self.config.secure_rng,
            seed=derive_seed(self.seed, "dp-server", purpose, info.round, info.attempt),
        )

    def epsilon(self) -> float:
        raise NotImplementedError

    def history_epsilon(self, history: Sequence[Mechanism], adjacency: Adjacency | None = None) -> float:
        """Epsilon of `history` by the run's accountant, for the run's neighbours (or `adjacency`)."""
        return accountant.epsilon(
            history, self.config.delta, self.config.accountant, adjacency or self.config.neighbours
        )

    def mechanisms(self) -> list[Mechanism]:
        """The Gaussian mechanisms the run's epsilon composes ([] where it is not such a list)."""
        return []

    def labels(self) -> dict[str, str]:
        """What every epsilon of the run is: its unit, its neighbours and its accountant."""
        return {
            "unit": self.unit.value,
            "adjacency": self.config.neighbours.value,
            "accountant": self.accountant_name(),
        }

    def replace_one_epsilon(self) -> float | None:
        """The same run's epsilon for replace-one neighbours (the honest figure where the size of
        the data is public), by PLD; None where it does not apply."""
        history = self.mechanisms()
        if not history or self.config.neighbours is not Adjacency.ADD_REMOVE:
            return None
        return accountant.epsilon(history, self.config.delta, Accountant.PLD, Adjacency.REPLACE_ONE)

    def within_target(self, projected: float) -> None:
        """StopRun unless `projected` (the run's epsilon if the next step happens) is within target."""
        target = self.config.target_epsilon
        if target is not None and projected > target * (1 + 1e-6):
            self.stopped = (
                f"going on would take epsilon to {projected:.4g} (delta {self.config.delta:g}), "
                f"over the target {target:g}: the run ends at epsilon {self.epsilon():.4g}"
            )
            raise StopRun(self.stopped)

    def account(self, aggregate: Aggregate, info: RoundInfo) -> None:
        self.refused += sum(1 for d in aggregate.dropped.values() if d.refusal is RefusalCode.PRIVACY_BUDGET)
        aggregate.measure(self.section, mode=self.mode)
        reported = {}
        for site in aggregate.contributors:
            metrics = aggregate.site_metrics.get(site, {})
            if EPSILON in metrics:
                reported[site] = self.site_epsilon[site] = float(metrics[EPSILON])
            if NOISE in metrics:
                self.site_noise[site] = float(metrics[NOISE])
        if reported:
            aggregate.measure(self.section, site_epsilon=reported)
        self.account_round(aggregate, info)
        aggregate.measure(self.section, epsilon=self.epsilon(), delta=self.config.delta, **self.labels())

    def account_round(self, aggregate: Aggregate, info: RoundInfo) -> None:
        """The stage's own accounting of a round whose aggregate the server holds."""

    def summary(self) -> dict[str, Any]:
        return {
            "privacy": {
                "mode": self.mode,
                "epsilon": self.epsilon(),
                "delta": self.config.delta,
                **self.labels(),
                "epsilon_replace_one": self.replace_one_epsilon(),
                "accounting": self.accounting,
                "noise_multiplier": self.noise,
                "refused": self.refused,
                "secure_rng": self.config.secure_rng,
                "stopped_early": self.stopped,
                "site_epsilon": dict(sorted(self.site_epsilon.items())),
                "site_noise_multiplier": dict(sorted(self.site_noise.items())),
                **self.summary_details(),
            }
        }

    def summary_details(self) -> dict[str, Any]:
        return {}

    def accountant_name(self) -> str:
        return self.config.accountant.value

    def state_dict(self) -> dict[str, Any]:
        return {
            "noise": self.noise,
            "stopped": self.stopped,
            "refused": self.refused,
            "site_epsilon": self.site_epsilon,
            "site_noise": self.site_noise,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.noise, self.stopped, self.refused = state["noise"], state["stopped"], int(state["refused"])
        self.site_epsilon = {k: float(v) for k, v in state["site_epsilon"].items()}
        self.site_noise = {k: float(v) for k, v in state["site_noise"].items()}
