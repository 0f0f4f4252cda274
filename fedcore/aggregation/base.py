"""Aggregation as a pipeline of stages (after TensorFlow Federated's aggregator factories).

A stage has a site part (the typed `StagePlan` item it sends, which the site applies to its
update: see `site.py`) and a server part. Wrappers (clip, noise, quantize) sit around one
leaf (weighted mean, robust rule, secure sum); the leaf talks to the sites through an
`Exchange` (as many exchanges as its protocol needs), and each wrapper then `finish`es the
aggregate on its way out, innermost first. Every stage has named state (`state_dict`,
saved with the run) and measurements (`account`, once the server holds an aggregate).

Nothing here knows a transport: the engine hands the leaf an `Exchange`.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from fedcore.aggregation.plans import StagePlan
from fedcore.errors import FedcoreError
from fedcore.tensors import Arrays

# A site's weight is at most this: no site can claim an absurd count and replace the model.
MAX_WEIGHT = 10**9


class StopRun(FedcoreError):
    """A stage says the run must end now (e.g. a target epsilon leaves no room for a round)."""


class Section(enum.StrEnum):
    """Where a stage's measurements go in the round's record."""

    AGGREGATION = "aggregation"
    PRIVACY = "privacy"
    SECURE_AGGREGATION = "secure_aggregation"


class DropReason(enum.StrEnum):
    UNAVAILABLE = "unavailable"  # the site vanished (stream ended, not connected, simulated dropout)
    DEADLINE = "missed the round deadline"
    REFUSED = "refused"  # the site declined (see RefusalCode)
    FAILED = "failed"  # the exchange raised at the server's side of the transport
    BAD_REPLY = "bad reply"  # malformed: shape, dtype, non-finite values, wrong message
    NOT_AGGREGATED = "not aggregated"  # e.g. secure aggregation needs two sites


class RefusalCode(enum.StrEnum):
    PRIVACY_BUDGET = "privacy budget"  # the site's own budget or privacy policy forbids the round
    BAD_INSTRUCTION = "bad instruction"
    FAILED = "failed"
    ABORTED = "secure aggregation aborted"


@dataclass(frozen=True)
class Drop:
    """Why a sampled site's input is not in the round's aggregate, and in which exchange."""

    reason: DropReason
    exchange: str = "fit"
    detail: str = ""
    refusal: RefusalCode | None = None
    # A site lost after its input entered a secure sum (at unmask) still counts in it.
    aggregated: bool = False

    def __str__(self) -> str:
        what = self.reason.value if self.refusal is None else f"{self.reason.value} ({self.refusal.value})"
        return f"{self.exchange}: {what}" + (f": {self.detail}" if self.detail else "")


@dataclass(frozen=True)
class SiteRequest:
    """What a stage sends one site in one exchange."""

    train: bool  # with the global model and the stage plan: train and contribute (a FIT)
    message: object | None = None  # the stage's own message (e.g. SecAgg+ keys)
    plan: tuple[StagePlan, ...] = ()  # with `train`: what each stage asks of the site


@dataclass(frozen=True)
class SiteReply:
    site: str
    update: Arrays | None = None  # a plain contribution (parameters after training - global)
    weight: float = 0.0  # its weight: the example count, or 1 under equal weights
    metrics: Mapping[str, float] = field(default_factory=dict)
    message: object | None = None  # the stage's own message (e.g. a masked input)


class Exchange(Protocol):
    """One round trip with `sites`: send each its request; hand each good reply to `accept`
    (which may raise to reject it); return the sites that dropped, with why."""

    def __call__(
        self,
        exchange: str,
        sites: Sequence[str],
        request: Callable[[str], SiteRequest],
        accept: Callable[[SiteReply], None],
    ) -> Awaitable[dict[str, Drop]]: ...


@dataclass(frozen=True)
class RoundInfo:
    run_id: str
    round: int
    attempt: int
    sampled: tuple[str, ...]
    available: int  # sites connected when the round was sampled
    model: Arrays  # the global model the round starts from
    seed: int
    max_weight: float = MAX_WEIGHT  # the public bound on a site's weight ([federation] max_examples_per_site)

    @property
    def dimension(self) -> int:
        return sum(a.size for a in self.model.values())


@dataclass
class Aggregate:
    """What the leaf gathered, as wrappers transform it on the way out. The next model's
    update is `sum / weight`; a leaf whose sum is still encoded (integers modulo 2**bits)
    leaves `sum` None for the wrapper that decodes it."""

    sum: Arrays | None
    weight: float
    count: int  # contributions in the sum
    contributors: list[str]
    dropped: dict[str, Drop] = field(default_factory=dict)
    integers: np.ndarray | None = None  # an encoded sum (secure aggregation)
    site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    measurements: dict[str, dict[str, Any]] = field(default_factory=dict)  # section -> values
    rejected: str | None = None  # why a stage refused the result (the attempt fails; still accounted)

    @property
    def mean(self) -> Arrays:
        if self.sum is None:
            raise ValueError("the aggregate is still encoded: a stage did not decode it")
        if not self.weight > 0:
            raise ValueError("the aggregate carries no weight")
        return {k: v / self.weight for k, v in self.sum.items()}

    def take_mean(self) -> Arrays:
        """The mean, made in place of the sum (which is then gone): no second float64 model."""
        if self.sum is None:
            raise ValueError("the aggregate is still encoded: a stage did not decode it")
        if not self.weight > 0:
            raise ValueError("the aggregate carries no weight")
        mean, self.sum = self.sum, None
        for k, v in mean.items():
            if v.dtype == np.float64 and v.flags.writeable:
                v /= self.weight
            else:
                mean[k] = v / self.weight
        return mean

    def measure(self, section: Section, **values: Any) -> None:
        self.measurements.setdefault(section.value, {}).update(values)


@dataclass(frozen=True)
class RoundContext:
    """What the leaf needs from the pipeline and the engine for one attempt at a round."""

    info: RoundInfo
    exchange: Exchange
    plan: Callable[[RoundInfo], tuple[StagePlan, ...]]  # the whole pipeline's site plan
    admit: Callable[[SiteReply], SiteReply]  # every wrapper's check of one site's input
    before_release: Callable[[int], None]  # may raise StopRun before a sum is decrypted
    completes_any_sample: bool  # the round completes with whoever replied


class Stage:
    """A stage's server part. Defaults do nothing, so a stage overrides only what it does."""

    name: ClassVar[str]
    section: ClassVar[Section] = Section.AGGREGATION
    needs_individual_updates: ClassVar[bool] = False
    # The round completes with whoever replied, and retries keep its sample (DP sampling).
    completes_any_sample: ClassVar[bool] = False
    # Why the sites must not report exact evaluation metrics (None: they may).
    withholds_evaluation: ClassVar[str | None] = None
    reserved_metrics: ClassVar[frozenset[str]] = frozenset()  # reply metrics this stage owns
    # The stage accounts a privacy loss for every model released: a round must be durable
    # before its model leaves (else a crash could release a round the resumed run forgets).
    accounts_privacy: ClassVar[bool] = False

    def site_plan(self, info: RoundInfo) -> StagePlan | None:
        """What sites must do for this stage in this round (None: nothing)."""
        return None

    def sample(self, available: Sequence[str], info: RoundInfo) -> list[str] | None:
        """This stage's own sampling of the round's sites (None: the engine's)."""
        return None

    def check_round(self, info: RoundInfo) -> None:
        """Raise StopRun if the sampled round must not start."""

    def admit(self, reply: SiteReply, info: RoundInfo) -> SiteReply:
        """Check (and may change, e.g. re-clip) one site's plain input before it is summed."""
        return reply

    def before_release(self, contributors: int, info: RoundInfo) -> None:
        """Raise StopRun if a sum of `contributors` inputs must not be decrypted."""

    def finish(self, aggregate: Aggregate, info: RoundInfo) -> Aggregate:
        """The server part of a wrapper: transform the inner stages' aggregate."""
        return aggregate

    def account(self, aggregate: Aggregate, info: RoundInfo) -> None:
        """The server has seen `aggregate` (kept for the model or not): account, measure."""

    def summary(self) -> dict[str, Any]:
        """What the run spent or did, for summary.json (empty: nothing to say)."""
        return {}

    def statistics_released(self) -> None:
        """A statistics sum was released before round 1 (privacy stages account it)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything this stage needs to continue the run (JSON-serializable)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state_dict()`'s value."""


class Leaf(Stage):
    async def collect(self, context: RoundContext) -> Aggregate | None:
        """Run the leaf's exchanges; the aggregate, or None when the attempt failed."""
        raise NotImplementedError
