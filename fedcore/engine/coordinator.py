"""The Coordinator: one run's round state machine, transport-agnostic.

Per round: wait for enough sites, sample, send the fit instruction with a deadline, fold
replies into the aggregation stage as they arrive, apply the strategy, evaluate (on the
server's held-out split, else federated), record. A round with fewer than `min_sites`
replies is retried; a site that vanishes or misses the deadline is data for the round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedcore.aggregation import AggregationStage, WeightedMean
from fedcore.config import Experiment, PrivacyMode
from fedcore.engine.messages import Config, Instruction, InstructionKind, Reply
from fedcore.engine.records import RoundRecord, RoundStore
from fedcore.engine.transport import Transport
from fedcore.errors import ConfigError, FedcoreError, ProtocolError, SiteUnavailable
from fedcore.privacy.run_privacy import RunPrivacy, TargetReached
from fedcore.seeding import derive_seed, rng
from fedcore.strategies import Strategy, build_strategy
from fedcore.tasks import Dataset, Task
from fedcore.tensors import Arrays

log = logging.getLogger(__name__)


# A site's weight in the average is its example count: bounded, so that no site can claim
# an absurd count and replace the model with its own update.
MAX_EXAMPLES = 10**9


class RoundFailed(FedcoreError):
    """A round could not gather enough replies within its retries."""


@dataclass
class RunResult:
    parameters: Arrays
    records: list[RoundRecord]


class Coordinator:
    def __init__(
        self,
        *,
        experiment: Experiment,
        task: Task,
        transport: Transport,
        store: RoundStore,
        test_data: Dataset | None,
        strategy: Strategy | None = None,
        aggregation: AggregationStage | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
        ordered_replies: bool = True,
    ) -> None:
        self.experiment = experiment
        self.task = task
        self.transport = transport
        self.store = store
        self.test_data = test_data
        self.strategy = strategy or build_strategy(experiment.strategy)
        self.aggregation = aggregation or WeightedMean()
        self.on_round = on_round
        self.ordered_replies = ordered_replies
        self.parameters = task.initial_parameters(derive_seed(experiment.seed, "init"))
        if experiment.secure_aggregation.enabled and self.strategy.needs_individual_updates:
            raise ConfigError(
                f"strategy {self.strategy.name} needs every site's update; with secure aggregation "
                "the server only learns their sum: choose fedavg, fedprox or a FedOpt strategy"
            )
        self.privacy = RunPrivacy(experiment, self.parameters) if experiment.privacy.enabled else None
        if (
            self.privacy is not None
            and experiment.privacy.mode is PrivacyMode.SAMPLE
            and not task.supports_dp_sgd
        ):
            raise ConfigError(f"task {task.name!r} cannot train with DP-SGD ([privacy] mode = 'sample')")
        self._available = 0  # sites connected when the current round was sampled
        self.round = 0  # last completed round

    async def run(self) -> RunResult:
        """Run every round, then tell the sites the run is over."""
        records = []
        completed = False
        try:
            with contextlib.suppress(TargetReached):  # the run's target epsilon is spent
                while self.round < self.experiment.federation.rounds:
                    records.append(await self._round_with_retries(self.round + 1))
            completed = True
            return RunResult(self.parameters, records)
        finally:
            reason = "run complete" if completed else "run stopped"
            if completed and self.privacy is not None and self.privacy.stopped:
                reason = f"run complete, early: {self.privacy.stopped}"
            await asyncio.shield(self.transport.finish(completed=completed, reason=reason))

    async def _round_with_retries(self, number: int) -> RoundRecord:
        fed = self.experiment.federation
        for attempt in range(1, fed.max_round_retries + 2):
            record = await self._round(number, attempt)
            if record is not None:
                self.round = number
                self.store.record(record, self.parameters)
                if self.on_round:
                    self.on_round(record)
                return record
        raise RoundFailed(
            f"round {number} got fewer than {fed.min_sites} replies in {fed.max_round_retries + 1} attempts"
        )

    def _sample(self, number: int, attempt: int) -> list[str]:
        available = sorted(self.transport.available())
        self._available = len(available)
        if self.privacy is not None and (poisson := self.privacy.sample(available, number)) is not None:
            return poisson
        k = self.experiment.federation.sites_per_round
        if k is None or k >= len(available):
            return available
        chosen = rng(self.experiment.seed, "sample", number, attempt).choice(
            len(available), size=k, replace=False
        )
        return sorted(available[i] for i in chosen)

    def fit_config(self, number: int, site: str) -> Config:
        t = self.experiment.task
        defaults = self.task.defaults
        return {
            "local_epochs": t.local_epochs or defaults["local_epochs"],
            "batch_size": t.batch_size or defaults["batch_size"],
            "lr": t.lr or defaults["lr"],
            "weight_decay": t.weight_decay if t.weight_decay is not None else defaults["weight_decay"],
            "seed": derive_seed(self.experiment.seed, "train", number, site),
            **self.strategy.fit_config(number),
        }

    async def _gather(
        self,
        sites: list[str],
        instruction_for: Callable[[str], Instruction],
        on_reply: Callable[[Reply], None],
    ) -> dict[str, str]:
        """Send to every site; hand each good reply to `on_reply`; return the dropped sites
        with reasons. Late sites are cancelled at the round's deadline.

        With `ordered_replies` (the default), replies are handed on in `sites` order whatever
        order they arrive in (early ones wait in a buffer), so the floating-point sum, and so
        the model, does not depend on timing: the same seed gives the same model with any
        number of workers. The buffer can hold up to all replies; a deployment that must keep
        memory at one model turns it off and folds replies as they arrive."""
        dropped: dict[str, str] = {}
        settled: dict[str, Reply | str] = {}  # site -> its reply, or why it has none
        order = iter(sites)
        upcoming = next(order, None)

        def hand_on(site: str, outcome: Reply | str) -> None:
            if isinstance(outcome, str):
                dropped[site] = outcome
            elif outcome.refusal is not None:
                dropped[site] = f"refused: {outcome.refusal}"
            else:
                try:
                    on_reply(outcome)
                except Exception as err:  # malformed in a way the checks did not name
                    dropped[site] = f"bad reply: {err}"

        def settle(site: str, outcome: Reply | str) -> None:
            nonlocal upcoming
            if not self.ordered_replies:
                hand_on(site, outcome)
                return
            settled[site] = outcome
            while upcoming is not None and upcoming in settled:
                hand_on(upcoming, settled.pop(upcoming))
                upcoming = next(order, None)

        def outcome_of(task: asyncio.Future[Reply], site: str) -> Reply | str:
            try:
                return task.result()
            except SiteUnavailable as err:
                return f"unavailable: {err.reason}"
            except Exception as err:  # a site's crash is data for the round
                log.exception("site %s failed", site)
                return f"failed: {type(err).__name__}: {err}"

        tasks = {asyncio.ensure_future(self.transport.request(s, instruction_for(s))): s for s in sites}
        handled: set[asyncio.Future[Reply]] = set()
        try:
            async with asyncio.timeout(self.experiment.federation.round_timeout):
                while len(handled) < len(tasks):
                    done, _ = await asyncio.wait(set(tasks) - handled, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        handled.add(task)
                        settle(tasks[task], outcome_of(task, tasks[task]))
        except TimeoutError:
            pass
        finally:
            # Every task is accounted for exactly once: finished ones (even those that
            # finished as the deadline struck) by their outcome, the rest as late.
            for task, site in tasks.items():
                if task in handled:
                    continue
                if task.done():
                    outcome = outcome_of(task, site)
                else:
                    task.cancel()
                    outcome = "missed the round deadline"
                handled.add(task)
                settle(site, outcome)
            await asyncio.gather(*tasks, return_exceptions=True)
        return dropped

    async def _round(self, number: int, attempt: int) -> RoundRecord | None:
        fed = self.experiment.federation
        first = number == 1 and attempt == 1
        await self.transport.wait_for_sites((fed.start_sites or fed.min_sites) if first else fed.min_sites)
        started = time.perf_counter()
        sampled = self._sample(number, attempt)
        if self.privacy is not None:
            try:  # before any instruction leaves: the sample, hence q and the sites, is known
                self.privacy.check_next_round(self._available, len(sampled))
            except TargetReached as stop:
                log.warning("stopping before round %d: %s", number, stop)
                raise
        if self.experiment.secure_aggregation.enabled:
            return await self._secure_round(number, attempt, sampled, started)
        stage = self.aggregation
        if self.privacy is not None and self.privacy.mode is PrivacyMode.USER_CENTRAL:
            stage = self.privacy.central_stage(self._available)
        accumulator = stage.start(self.parameters)
        dp_config = self.privacy.fit_config(len(sampled)) if self.privacy is not None else {}
        fit_metrics: dict[str, list[tuple[float, int]]] = {}
        site_epsilon: dict[str, float] = {}
        replied: list[str] = []
        received = 0
        unclipped = 0

        def fold(reply: Reply) -> None:
            nonlocal received
            if reply.update is None or not 0 < reply.num_examples <= MAX_EXAMPLES:
                raise ProtocolError(
                    f"fit reply needs an update and 1..{MAX_EXAMPLES} examples, got {reply.num_examples}"
                )
            accumulator.add(reply.update, float(reply.num_examples))
            replied.append(reply.site)
            received += sum(a.nbytes for a in reply.update.values())
            self._fit_metrics(reply, fit_metrics, site_epsilon)
            nonlocal unclipped
            unclipped += int(reply.metrics.get("unclipped", 0.0) >= 0.5)

        dropped = await self._gather(
            sampled,
            lambda s: Instruction(
                InstructionKind.FIT,
                number,
                self.parameters,
                {**self.fit_config(number, s), **dp_config},
                attempt,
            ),
            fold,
        )
        for site, reason in dropped.items():
            log.info("round %d: dropped %s (%s)", number, site, reason)
        if len(replied) < fed.min_sites and not self._completes_any_sample:
            log.warning(
                "round %d attempt %d: %d of %d sites replied, need %d; retrying",
                number,
                attempt,
                len(replied),
                len(sampled),
                fed.min_sites,
            )
            return None
        aggregate = accumulator.result()
        sent = sum(a.nbytes for a in self.parameters.values()) * len(sampled)
        self.parameters = self.strategy.apply(self.parameters, aggregate.mean)
        accuracy, loss, mode = await self._evaluate(number, sorted(replied))
        privacy = self._account(aggregate.count, unclipped)
        return RoundRecord(
            round=number,
            sites=aggregate.count,
            accuracy=accuracy,
            loss=loss,
            seconds=time.perf_counter() - started,
            sampled=sampled,
            dropped=dropped,
            train_loss=_weighted(fit_metrics.get("train_loss", [])),
            fit_metrics={
                k: v for k, values in sorted(fit_metrics.items()) if (v := _weighted(values)) is not None
            },
            attempt=attempt,
            evaluation=mode,
            examples=round(aggregate.total_weight),
            bytes_sent=sent,
            bytes_received=received,
            epsilon=privacy.get("epsilon"),
            delta=privacy.get("delta"),
            site_epsilon=site_epsilon,
            privacy=privacy,
        )

    @property
    def _completes_any_sample(self) -> bool:
        """User-central DP: a round completes with whoever replied (none: a noise-only update),
        and retries keep the round's sample. Redrawing until enough sites reply would change
        the sampling the accountant assumes (and leak who was sampled)."""
        return self.privacy is not None and self.privacy.mode is PrivacyMode.USER_CENTRAL

    async def _noise_only_round(
        self, number: int, attempt: int, sampled: list[str], started: float
    ) -> RoundRecord:
        aggregate = self.privacy.central_stage(self._available).start(self.parameters).result()  # type: ignore[union-attr]
        self.parameters = self.strategy.apply(self.parameters, aggregate.mean)
        accuracy, loss, evaluation = await self._evaluate(number, [])
        privacy = self._account(0, 0)
        return RoundRecord(
            round=number,
            sites=0,
            accuracy=accuracy,
            loss=loss,
            seconds=time.perf_counter() - started,
            sampled=sampled,
            dropped={s: "not aggregated: secure aggregation needs 2 sites" for s in sampled},
            attempt=attempt,
            evaluation=evaluation,
            epsilon=privacy.get("epsilon"),
            delta=privacy.get("delta"),
            privacy=privacy,
        )

    def _fit_metrics(
        self, reply: Reply, fit_metrics: dict[str, list[tuple[float, int]]], site_epsilon: dict[str, float]
    ) -> None:
        """Fold a fit reply's metrics; a site's privacy figures are its own, not averaged."""
        for key, value in reply.metrics.items():
            if key in ("epsilon", "epsilon_total", "unclipped"):
                continue
            fit_metrics.setdefault(key, []).append((value, max(reply.num_examples, 1)))
        if "epsilon" in reply.metrics and self.privacy is not None:
            site_epsilon[reply.site] = float(reply.metrics["epsilon"])
            self.privacy.observe(reply.site, reply.metrics)

    def _account(self, contributors: int, unclipped: int | None = None) -> dict[str, Any]:
        if self.privacy is None:
            return {}
        return self.privacy.complete_round(
            available=self._available, contributors=contributors, unclipped=unclipped
        )

    async def _secure_round(
        self, number: int, attempt: int, sampled: list[str], started: float
    ) -> RoundRecord | None:
        from fedcore.engine.secure_round import secure_aggregate

        dp_config = self.privacy.fit_config(len(sampled)) if self.privacy is not None else {}
        if len(sampled) < 2:
            # SecAgg+ needs two sites to hide one. A user-central round still releases its
            # (noise-only) update, so that sampling stays what the accountant assumes.
            if self._completes_any_sample:
                return await self._noise_only_round(number, attempt, sampled, started)
            log.warning(
                "round %d attempt %d: %d site(s) sampled, secure aggregation needs 2",
                number,
                attempt,
                len(sampled),
            )
            return None
        outcome = await secure_aggregate(self, number, attempt, sampled, dp_config)
        if outcome is None:
            return None
        count = len(outcome.masked)
        if count < self.experiment.federation.min_sites and not self._completes_any_sample:
            if self.privacy is not None and self.privacy.mode is PrivacyMode.USER_DISTRIBUTED:
                self._account(count)  # the server decrypted this sum: it counts, released or not
            log.warning(
                "round %d attempt %d: %d masked inputs, need %d; retrying",
                number,
                attempt,
                count,
                self.experiment.federation.min_sites,
            )
            return None
        mode = self.privacy.mode if self.privacy is not None else PrivacyMode.NONE
        if mode is PrivacyMode.USER_DISTRIBUTED:
            assert self.privacy is not None
            aggregate, _ = self.privacy.distributed_mean(outcome.total, self.parameters, len(sampled))
            mean, total_weight = aggregate.mean, aggregate.total_weight
        elif mode is PrivacyMode.USER_CENTRAL:
            assert self.privacy is not None
            sums, sites = outcome.sums(self.parameters)
            aggregate = self.privacy.central_stage(self._available).noisy_mean(sums, sites)
            mean, total_weight = aggregate.mean, aggregate.total_weight
        else:
            mean, total_weight = outcome.mean(self.parameters)
        site_epsilon: dict[str, float] = {}
        fit_metrics: dict[str, list[tuple[float, int]]] = {}
        for site in outcome.masked:
            if site in outcome.fit_metrics:
                reply = Reply(site, InstructionKind.FIT, number, metrics=outcome.fit_metrics[site])
                self._fit_metrics(reply, fit_metrics, site_epsilon)
        self.parameters = self.strategy.apply(self.parameters, mean)
        accuracy, loss, evaluation = await self._evaluate(number, sorted(set(sampled) - set(outcome.dropped)))
        privacy = self._account(count)
        return RoundRecord(
            round=number,
            sites=count,
            accuracy=accuracy,
            loss=loss,
            seconds=time.perf_counter() - started,
            sampled=sampled,
            dropped=outcome.dropped,
            train_loss=_weighted(fit_metrics.get("train_loss", [])),
            attempt=attempt,
            evaluation=evaluation,
            secure_aggregation={**outcome.metrics, "total_weight": total_weight},
            epsilon=privacy.get("epsilon"),
            delta=privacy.get("delta"),
            site_epsilon=site_epsilon,
            privacy=privacy,
        )

    async def _evaluate(self, number: int, sites: list[str]) -> tuple[float | None, float | None, str]:
        if self.test_data is not None:
            result = await asyncio.to_thread(self.task.evaluate, self.parameters, self.test_data)
            return result.accuracy, result.loss, "central"
        if self.privacy is not None:
            # Exact federated metrics would be statistics of the sites' data outside the DP
            # guarantee (and sites with a privacy policy refuse them).
            return None, None, "none (differential privacy)"
        accs: list[tuple[float, int]] = []
        losses: list[tuple[float, int]] = []

        def collect(reply: Reply) -> None:
            accuracy, loss = reply.metrics.get("accuracy"), reply.metrics.get("loss")
            if (
                accuracy is None
                or loss is None
                or not math.isfinite(loss)
                or not 0 < reply.num_examples <= MAX_EXAMPLES
            ):
                raise ProtocolError("evaluation reply without finite loss, accuracy and examples")
            if math.isfinite(accuracy):  # a hosted client may report no accuracy (NaN)
                accs.append((accuracy, reply.num_examples))
            losses.append((loss, reply.num_examples))

        instruction = Instruction(InstructionKind.EVALUATE, number, self.parameters)
        await self._gather(sites, lambda s: instruction, collect)
        return _weighted(accs), _weighted(losses), "federated"


def _weighted(values: list[tuple[float, int]]) -> float | None:
    total = sum(n for _, n in values)
    return sum(v * n for v, n in values) / total if total else None
