"""The site part of every stage: what a site does with the stage plan of a fit instruction.

Before training, the site's own privacy policy judges the plan (its budget, its noise floor,
whether it takes part without noise it adds) and turns a DP-SGD item into training settings;
a round it forbids is refused untrained. After training, the update goes through the plan's
items in order (clip, distributed noise or quantization) and, under secure aggregation, is
masked. The privacy the round cost is written to the site's ledger before anything leaves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedcore.aggregation.plans import (
    CentralNoisePlan,
    ClipPlan,
    DistributedNoisePlan,
    QuantizePlan,
    SampleDPPlan,
    StagePlan,
    StatisticsNoisePlan,
    StatisticsScalePlan,
)
from fedcore.errors import PrivacyBudgetError, ProtocolError
from fedcore.privacy.accountant import Mechanism
from fedcore.privacy.distributed import DistributedNoise
from fedcore.privacy.distributed import encode as encode_distributed
from fedcore.privacy.dpsgd import SampleDP
from fedcore.privacy.randomness import SecureRandom, dp_random
from fedcore.privacy.site_policy import RoundPlan, SitePrivacy
from fedcore.secagg.client import SecAggClient, SecAggState
from fedcore.secagg.contribution import quantized_contribution, weight
from fedcore.secagg.identity import Identity
from fedcore.secagg.stages.messages import RoutedShares
from fedcore.tensors import Arrays, clip_l2, flatten

PRIVACY_METRICS = ("epsilon", "epsilon_total", "noise_multiplier")  # what a site reports of its spend


@dataclass(frozen=True)
class Prepared:
    """The plan, judged by the site's policy, ready for training."""

    plan: tuple[StagePlan, ...]
    dp: SampleDP | None = None  # DP-SGD settings for the task's training
    secure_rng: bool = True
    spend: RoundPlan | None = None  # what the ledger records before the update leaves
    sensitivity: float | None = None  # statistics: one record's L2 contribution, what noise scales to

    @property
    def private(self) -> bool:
        return any(item.private for item in self.plan)


@dataclass(frozen=True)
class Encoded:
    """A fit's contribution as encoded before masking, and what the ledger recorded for it."""

    key: str  # the fit it answers (see Site.fit_key)
    update: Arrays  # the clipped update (plain contributions)
    weight: int  # the example count it claims
    integers: np.ndarray | None  # the integer encoding a secure sum adds
    metrics: dict[str, float]  # what leaves with it (the privacy spend under DP)


@dataclass(frozen=True)
class Contribution:
    """What leaves the site for the round."""

    update: Arrays | None = None  # a plain contribution
    weight: int = 0  # the example count it claims (1 under equal weights)
    metrics: dict[str, float] = field(default_factory=dict)
    message: object | None = None  # a masked input, under secure aggregation


def _one(plan: tuple[StagePlan, ...], kind: type) -> object | None:
    found = [item for item in plan if isinstance(item, kind)]
    if len(found) > 1:
        raise ProtocolError(f"the stage plan holds {len(found)} {kind.__name__} items")
    return found[0] if found else None


class SiteStages:
    def __init__(
        self,
        name: str,
        privacy: SitePrivacy | None = None,
        *,
        remembers: bool = True,
        identity: Identity | None = None,
    ) -> None:
        """`remembers`: the site lives on between instructions (a site agent) and keeps its
        last contribution for `replay`; a simulated site, rebuilt for every instruction, does
        not. `identity`: the key this site signs its secure-aggregation messages with, and
        its check of its neighbours' (None: it trusts the server to relay them honestly)."""
        self.remembers = remembers
        self.privacy = privacy or SitePrivacy()
        policy = self.privacy.policy
        self.secagg = SecAggClient(
            name, identity, min_cohort=policy.min_secure_cohort, colluding_fraction=policy.colluding_fraction
        )
        self.private = False  # this site has trained under DP: no exact statistics leave it
        self._last: Encoded | None = None  # the last fit's encoding, for `replay`

    @property
    def protective(self) -> bool:
        return self.privacy.protective

    def exchange(self, message: object, round_number: int) -> object:
        """A stage's exchange that carries no model (SecAgg+ keys, shares, unmasking)."""
        return self.secagg.step(message, round_number)

    def prepare(
        self,
        plan: tuple[StagePlan, ...],
        *,
        masked: bool,
        dimension: int,
        sensitivity: float | None = None,
    ) -> Prepared:
        """Judge the plan by the site's policy; PrivacyBudgetError when it forbids the round.
        `sensitivity`: a statistics vector's per-record L2 bound (None: unbounded)."""
        sample = _one(plan, SampleDPPlan)
        distributed = _one(plan, DistributedNoisePlan)
        central = _one(plan, CentralNoisePlan)
        statistics = _one(plan, StatisticsNoisePlan)
        quantize = _one(plan, QuantizePlan)
        if sum(x is not None for x in (sample, distributed, central, statistics)) > 1:
            raise ProtocolError("the stage plan asks for two kinds of differential privacy")
        if masked != (quantize is not None or distributed is not None):
            raise ProtocolError(
                "a masked contribution needs an integer encoding, and only a masked one has one"
            )
        if quantize is not None and distributed is not None:
            raise ProtocolError("the stage plan encodes the update twice")
        if (encoding := quantize or distributed) is not None and plan[-1] is not encoding:
            # Items after the encoding would change only the plain copy, which a masked
            # contribution never sends: noise or clipping placed there would be skipped.
            raise ProtocolError("the integer encoding must be the stage plan's last item")
        prepared = Prepared(plan)
        if isinstance(sample, SampleDPPlan):
            spend = self.privacy.plan_dp_sgd(
                noise_multiplier=sample.noise_multiplier,
                target_epsilon=sample.target_epsilon,
                rounds=sample.rounds,
                max_grad_norm=sample.max_grad_norm,
                sample_rate=sample.sample_rate,
                local_steps=sample.local_steps,
                accountant=sample.accountant,
                adjacency=sample.adjacency,
                expected_batch=sample.expected_batch,
                ghost_clipping=sample.ghost_clipping,
                delta=sample.delta,
                run=sample.run,
                statistics_noise=sample.statistics_noise,
            )
            rng = self.privacy.secure_rng(sample.secure_rng)
            prepared = Prepared(plan, dp=spend.dp, secure_rng=rng, spend=spend)
        elif isinstance(distributed, DistributedNoisePlan):
            noise = DistributedNoise(
                distributed.clip_norm,
                distributed.scale,
                distributed.sigma,
                distributed.bits,
                distributed.rotation,
            )
            spend = self.privacy.plan_distributed(
                noise,
                delta=distributed.delta,
                run=distributed.run,
                dimension=dimension,
                participants=self.secagg.threshold() if masked else None,
            )
            prepared = Prepared(plan, secure_rng=self.privacy.secure_rng(distributed.secure_rng), spend=spend)
        elif isinstance(statistics, StatisticsNoisePlan):
            if sensitivity is None:
                raise PrivacyBudgetError(
                    "privacy policy: the task's statistics have no per-record bound (no public "
                    "ranges), so no noise can make them private"
                )
            spend = self.privacy.plan_statistics(
                noise_multiplier=statistics.noise_multiplier, delta=statistics.delta, run=statistics.run
            )
            rng = self.privacy.secure_rng(statistics.secure_rng)
            prepared = Prepared(plan, secure_rng=rng, spend=spend, sensitivity=sensitivity)
        else:
            self.privacy.refuse_unaccounted("user-central DP" if central is not None else "no DP")
        if prepared.private:
            self.private = True
        elif self.private:
            raise PrivacyBudgetError(
                "privacy policy: this site has trained under differential privacy in this run; "
                "it releases nothing more without it"
            )
        return prepared

    def replay(self, key: str) -> Encoded | None:
        """The encoding already made for this exact fit (same run, round, model, settings and
        plan), if it was the last one and was sent in the clear: resending it releases nothing
        the site has not already released and charged, so it is not charged again (a server
        that crashed and redoes the round). A masked encoding is never resent: a second sum
        of the same session over other survivors, minus the first, would give one site's
        input with noise that cancels; it is made afresh, with fresh noise, and charged."""
        cached = self._last
        if cached is None or cached.key != key or cached.integers is not None:
            return None
        return cached

    def encode(
        self,
        prepared: Prepared,
        *,
        key: str,
        update: Arrays,
        examples: int,
        metrics: Mapping[str, float],
        template: Arrays,
        seed: int,
    ) -> Encoded:
        """Encode the trained update through the plan and record the spend in the ledger
        (before anything leaves); kept for `replay`."""
        # Under DP only the privacy accounting goes with the update: a training loss or an
        # exact example count would be statistics of the data that no noise covers.
        out = {} if prepared.private else dict(metrics)
        claimed = 1 if prepared.private else examples  # equal weights under DP: no count leaves
        integers: np.ndarray | None = None
        for item in prepared.plan:
            if isinstance(item, ClipPlan):
                update, within = clip_l2(update, item.norm)
                if item.equal_weights:
                    claimed = 1  # every site weighs the same: its size need not leave
                if item.report_unclipped:
                    out["unclipped"] = float(within)
            elif isinstance(item, DistributedNoisePlan) and prepared.spend is not None:
                assert prepared.spend.distributed is not None
                random = dp_random(secure=prepared.secure_rng, seed=seed)
                noise = prepared.spend.distributed
                encoded = encode_distributed(flatten(update, template), noise, random)
                # Modulo 2**bits: the low bits of the two's complement (uint32 below 64 bits).
                integers = encoded.astype(np.uint32) if noise.bits <= 32 else encoded.view(np.uint64)
            elif isinstance(item, StatisticsNoisePlan) and prepared.spend is not None:
                assert prepared.sensitivity is not None
                std = prepared.spend.mechanism.noise_multiplier * prepared.sensitivity
                random = dp_random(secure=prepared.secure_rng, seed=seed)
                update = {k: gaussian_noised(v, std, random) for k, v in update.items()}
            elif isinstance(item, StatisticsScalePlan):
                if not item.scale >= 1:
                    raise ProtocolError(f"a statistics scale must be >= 1, got {item.scale}")
                update = {k: v / item.scale for k, v in update.items()}
            elif isinstance(item, QuantizePlan):
                integers = quantized_contribution(
                    update,
                    template,
                    # Under DP, equal weights whatever the plan says: a masked weight is still the
                    # count, exact, in every sum the server decrypts.
                    weight=1.0
                    if item.equal_weights or prepared.private
                    else weight(examples, item.max_examples),
                    clip=item.clip_range,
                    step=item.step,
                    bits=item.bits,
                    rng=SecureRandom(),  # stochastic rounding from AES-CTR keyed by the OS
                )
        if prepared.spend is not None:
            out.update(self.privacy.spend(prepared.spend))  # written before anything leaves the site
        made = Encoded(key, update, claimed, integers, out)
        if self.remembers:  # a masked encoding is never resent (see replay)
            self._last = made if integers is None else None
        return made

    def release(self, encoded: Encoded, *, round_number: int, routed: object | None) -> Contribution:
        """What leaves the site: the update, or under secure aggregation its masked encoding."""
        if routed is None:
            if encoded.integers is not None:
                raise ProtocolError("an integer encoding leaves the site only masked")
            return Contribution(update=encoded.update, weight=encoded.weight, metrics=dict(encoded.metrics))
        if not isinstance(routed, RoutedShares) or encoded.integers is None:
            raise ProtocolError("a masked contribution needs the routed shares and an encoding")
        message = self.secagg.mask(routed, round_number, encoded.integers)  # in place: never resent
        # Secure aggregation: the server gets a masked vector and the privacy accounting,
        # nothing else of the site's.
        return Contribution(
            metrics={k: v for k, v in encoded.metrics.items() if k in PRIVACY_METRICS}, message=message
        )

    def export_state(self) -> StageState | None:
        """What a simulated site keeps between instructions (None: nothing)."""
        state = StageState(self.secagg.state, self.privacy.ledger.state(), self.private)
        return None if state == StageState() else state

    def import_state(self, state: StageState | None) -> None:
        state = state or StageState()
        self.secagg.state, self.private = state.secagg, state.private
        self.privacy.ledger.restore(state.ledger)


def gaussian_noised(values: np.ndarray, std: float, random: SecureRandom) -> np.ndarray:
    """values + N(0, std^2), snapped to a power-of-two grid far below the noise (std / 2^10
    or finer): the low bits of a float sum cannot tell which values were noised (Mironov 2012)."""
    noised = values + random.gaussian(values.size, std).reshape(values.shape)
    grid = math.ldexp(1.0, math.frexp(std)[1] - 11)
    snapped: np.ndarray = np.round(noised / grid) * grid
    return snapped


@dataclass
class StageState:
    """A simulated site's stage state between instructions."""

    secagg: SecAggState | None = None  # the SecAgg+ client state, within a round only
    ledger: dict[str, list[Mechanism]] = field(default_factory=dict)  # the privacy spent, per run
    private: bool = False  # it has trained under DP

    def to_json(self) -> dict[str, Any]:
        """The state between rounds, JSON: a round under way is redone whole on resume, so
        its secure-aggregation state is not kept."""
        return {
            "ledger": {
                run: [[m.noise_multiplier, m.sample_rate, m.steps] for m in spent]
                for run, spent in self.ledger.items()
            },
            "private": self.private,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StageState:
        ledger = {
            str(run): [Mechanism(float(z), float(q), int(n)) for z, q, n in spent]
            for run, spent in data["ledger"].items()
        }
        return cls(None, ledger, bool(data["private"]))
