"""The Coordinator: one run's round driver, transport-agnostic.

Per round: wait for enough sites, sample (the pipeline may sample itself), let the pipeline
check the round may start, hand it an `Exchange` over the transport and take the aggregate,
apply the strategy, evaluate (on the server's held-out split, else federated), record. An
attempt that fails (too few inputs, a secure sum aborted) is retried; a round whose last
attempt's result is rejected with no one to blame (a secure sum out of range) is skipped,
the model unchanged, so that no site can stop the run; a site that vanishes or misses the
deadline is data for the round. Privacy and secure aggregation are stages of the pipeline.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence

import numpy as np

from fedcore.aggregation import (
    MAX_WEIGHT,
    Drop,
    Exchange,
    Pipeline,
    RoundInfo,
    Section,
    SiteReply,
    SiteRequest,
    StopRun,
)
from fedcore.aggregation.builder import pipeline_for
from fedcore.aggregation.statistics import statistics_pipeline_for
from fedcore.config import Experiment
from fedcore.engine import faults
from fedcore.engine.exclusion import Exclusions
from fedcore.engine.gather import Deadlines, EvaluationMetrics, Traffic, gather, weighted
from fedcore.engine.messages import Config, Instruction, InstructionKind, Reply
from fedcore.engine.records import RoundRecord, RoundStore, RunResult, record_durably
from fedcore.engine.run_state import RunState
from fedcore.engine.statistics import RoundFailed, gather_statistics, statistics_config
from fedcore.engine.transport import Transport
from fedcore.seeding import derive_seed, rng
from fedcore.strategies import Strategy, build_strategy
from fedcore.tasks import Dataset, Task, max_examples_per_site

log = logging.getLogger(__name__)


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
        pipeline: Pipeline | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
        run_id: str | None = None,
        resume: RunState | None = None,
        history: Sequence[RoundRecord] = (),
    ) -> None:
        """`resume`: continue a run from its saved state (`history`: its records so far)."""
        self.experiment = experiment
        self.task = task
        self.transport = transport
        self.store = store
        self.test_data = test_data
        self.strategy = strategy or build_strategy(experiment.strategy)
        self.pipeline = pipeline or pipeline_for(experiment, task)
        self.statistics: np.ndarray | None = None  # the task's federated statistics (before round 1)
        self._statistics_config: Config = {}  # what every instruction carries of them (encoded once)
        self._statistics_pipeline = statistics_pipeline_for(experiment, task, self.pipeline)
        self.on_round = on_round
        self.run_id = run_id or uuid.uuid4().hex
        self.exclusions = Exclusions(transport)  # sites that misbehaved: out for the rest of the run
        self.parameters = task.initial_parameters(derive_seed(experiment.seed, "init"))
        self.max_examples = max_examples_per_site(experiment, task)
        self.round = 0  # last completed round
        self.records: list[RoundRecord] = []
        self.stopped: str | None = None
        self.roster: list[str] = []  # the sites available at the last completed round
        self.resumed_at: int | None = None  # the first round after a resume
        self._committing: asyncio.Future[None] | None = None  # the last round's store write
        self.deadlines = Deadlines(experiment.federation.round_timeout)
        self.store_failures: list[BaseException] = []  # writes that failed on I/O (then tried again)
        self.stopping = threading.Event()  # set when the run is cancelled: stop retrying writes
        self.commit_wait = 0.0
        faults.warn_if_armed()
        if resume is not None:
            self._restore(resume, history)

    def _restore(self, state: RunState, history: Sequence[RoundRecord]) -> None:
        if [r.round for r in history] != list(range(1, state.round + 1)):
            raise ValueError(
                f"the history of a run resumed after round {state.round} must hold rounds 1..{state.round}"
            )
        self.run_id, self.round, self.parameters = state.run_id, state.round, state.parameters
        self.strategy.load_state_dict(state.strategy)
        self.parameters = self.strategy.restored(state.parameters)
        self.pipeline.load_state_dict(state.pipeline)
        self.transport.load_state(state.transport)
        self.stopped, self.roster = state.stopped, list(state.roster)
        for site, reason in state.excluded.items():
            self.exclusions.exclude(site, reason)
        if state.statistics is not None:
            self._use_statistics(np.array(state.statistics, dtype=np.float64))
        self.records = list(history)
        self.resumed_at = state.round + 1

    def checkpoint(self) -> RunState:
        """The run's state after its last completed round: what `resume` continues from."""
        return RunState(
            run_id=self.run_id,
            round=self.round,
            parameters=self.strategy.released(self.parameters),  # what the run delivers and exports
            strategy=self.strategy.state_dict(),
            pipeline=copy.deepcopy(self.pipeline.state_dict()),  # a snapshot: stages go on
            stopped=self.stopped,
            roster=list(self.roster),
            transport=self.transport.state(),
            statistics=None if self.statistics is None else [float(v) for v in self.statistics],
            excluded=dict(self.exclusions.excluded),
        )

    def _use_statistics(self, total: np.ndarray) -> None:
        self.task.use_statistics(total)  # the server's own evaluation standardises alike
        self.statistics = total
        self._statistics_config = statistics_config(total)

    async def run(self) -> RunResult:
        """Run every remaining round, then tell the sites the run is over."""
        completed = False
        try:
            try:
                if self._statistics_pipeline is not None and self.statistics is None:
                    size, pipeline = self.task.statistics_size(), self._statistics_pipeline
                    self._use_statistics(
                        await gather_statistics(
                            self.experiment, size, pipeline, self.transport, self.run_id, self._gather
                        )
                    )
                while self.round < self.experiment.federation.rounds and not self.stopped:
                    self.records.append(await self._round_with_retries(self.round + 1))
            except StopRun as stop:  # a stage ended the run (e.g. its target epsilon is spent)
                self.stopped = str(stop)
                log.warning("stopping before round %d: %s", self.round + 1, stop)
            await self._settle()
            completed = True
            released = self.strategy.released(self.parameters)
            return RunResult(released, self.records, self.stopped, self.commit_wait)
        finally:
            self.stopping.set()
            if not completed and self._committing is not None:  # the store's write ends first
                (failed,) = await asyncio.shield(asyncio.gather(self._committing, return_exceptions=True))
                if isinstance(failed, BaseException):
                    log.error("round %d was not stored: %r", self.round, failed)
            reason = "run complete" if completed else "run stopped"
            if completed and self.stopped:
                reason = f"run complete, early: {self.stopped}"
            await asyncio.shield(self.transport.finish(completed=completed, reason=reason))

    async def _round_with_retries(self, number: int) -> RoundRecord:
        fed = self.experiment.federation
        for attempt in range(1, fed.max_round_retries + 2):
            record = await self._round(number, attempt)
            self.deadlines.observe(record.seconds if record else None)  # None: it failed
            if record is not None:
                self.round = number
                faults.reach(number, "before_commit")
                await self._commit(record)
                if self.on_round:
                    self.on_round(record)
                return record
        tries = fed.max_round_retries + 1
        raise RoundFailed(f"round {number} got fewer than {fed.min_sites} replies in {tries} attempts")

    async def _commit(self, record: RoundRecord) -> None:
        """Store the round with the run's state, in a thread; an I/O error pauses the run (and
        is alerted), never ends it. A run that accounts privacy waits: the round is durable
        before its model leaves. Otherwise the next round runs meanwhile (a crash before the
        write redoes the round, with the same result); writes stay in order, one at a time."""
        state, failed, stop = self.checkpoint(), self.store_failures.append, self.stopping
        await self._settle()
        write = functools.partial(record_durably, self.store, record, state, on_failure=failed, stop=stop)
        self._committing = asyncio.ensure_future(asyncio.to_thread(write))
        if self.pipeline.accounts_privacy:
            await self._settle()

    async def _settle(self) -> None:
        """Wait for the last round's store write (its error, if any, is the run's); a thread
        that cancellation cannot stop stays tracked until it is done."""
        if self._committing is not None:
            started = time.perf_counter()
            await asyncio.shield(self._committing)
            self._committing = None
            self.commit_wait += time.perf_counter() - started

    async def _wait_to_start(self) -> None:
        """Before round 1, `start_sites`; after a resume, also the last round's sites (they
        reconnect), so that the redone round samples the same sites, for up to a deadline."""
        fed = self.experiment.federation
        start = fed.start_sites or fed.min_sites
        if len(self.roster) > start:
            try:
                async with asyncio.timeout(self.deadlines.current()):
                    await self.transport.wait_for_sites(len(self.roster))
                return
            except TimeoutError:
                back, lost = len(self.transport.available()), len(self.roster)
                log.warning("resumed: %d of the last round's %d sites are back; going on", back, lost)
        await self.transport.wait_for_sites(start)

    def _sample(self, available: list[str], info: RoundInfo) -> list[str]:
        chosen = self.pipeline.sample(available, info)
        if chosen is not None:
            return chosen
        k = self.experiment.federation.sites_per_round
        if k is None or k >= len(available):
            return available
        draw = rng(self.experiment.seed, "sample", info.round, info.attempt)
        return sorted(available[i] for i in draw.choice(len(available), size=k, replace=False))

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
            **self._statistics_config,
        }

    async def _round(self, number: int, attempt: int) -> RoundRecord | None:
        fed = self.experiment.federation
        if attempt == 1 and number == (self.resumed_at or 1):
            await self._wait_to_start()
        else:
            await self.transport.wait_for_sites(fed.min_sites)
        faults.reach(number, faults.Point.BEFORE_SAMPLING)
        started = time.perf_counter()
        available = self.exclusions.allowed(sorted(self.transport.available()))
        seed, cap = self.experiment.seed, self.max_examples
        info = RoundInfo(self.run_id, number, attempt, (), len(available), self.parameters, seed, cap)
        info = dataclasses.replace(info, sampled=tuple(self._sample(available, info)))
        self.pipeline.check_round(info)  # before any instruction leaves
        self.transport.sampled(number, attempt, info.sampled)
        traffic = Traffic()
        if (aggregate := await self.pipeline.aggregate(info, self._exchange(info, traffic))) is None:
            return None
        faults.reach(number, faults.Point.AFTER_AGGREGATION)
        for site, drop in aggregate.dropped.items():
            log.info("round %d: dropped %s (%s)", number, site, drop)
        self.exclusions.judge(aggregate.dropped, number)
        skipped = aggregate.rejected
        if skipped is not None and attempt <= fed.max_round_retries:
            return None  # (the pipeline said why)
        if skipped is None and aggregate.count < fed.min_sites and not self.pipeline.completes_any_sample:
            got, need = aggregate.count, fed.min_sites
            log.warning(
                "round %d attempt %d: %d sites aggregated, need %d; retrying", number, attempt, got, need
            )
            return None
        if skipped is None:
            self.parameters = self.strategy.apply(self.parameters, aggregate.take_mean())
        else:  # no one to blame (e.g. a sum out of range): the run goes on from the same model
            log.error("round %d skipped after %d attempts: %s", number, attempt, skipped)
        accuracy, loss, evaluation, named = await self._evaluate(number, sorted(aggregate.contributors))
        sections = aggregate.measurements
        privacy = sections.get(Section.PRIVACY.value, {})
        self.roster = available
        fit_metrics = {
            k: v
            for k, values in sorted(
                traffic.metrics(aggregate.contributors, self.pipeline.reserved_metrics).items()
            )
            if (v := weighted(values)) is not None
        }
        return RoundRecord(
            round=number,
            sites=0 if skipped else aggregate.count,
            accuracy=accuracy,
            loss=loss,
            seconds=time.perf_counter() - started,
            sampled=list(info.sampled),
            dropped=aggregate.dropped,
            train_loss=fit_metrics.get("train_loss"),
            fit_metrics=fit_metrics,
            attempt=attempt,
            evaluation=evaluation,
            eval_metrics=named,
            examples=round(aggregate.weight) if math.isfinite(aggregate.weight) and not skipped else 0,
            bytes_sent=traffic.sent,
            bytes_received=traffic.received,
            secure_aggregation=sections.get(Section.SECURE_AGGREGATION.value, {}),
            aggregation=sections.get(Section.AGGREGATION.value, {}),
            epsilon=privacy.get("epsilon"),
            delta=privacy.get("delta"),
            site_epsilon=privacy.pop("site_epsilon", {}),
            privacy=privacy,
            declined=self.transport.declined(),
            skipped=skipped,
        )

    def _exchange(self, info: RoundInfo, traffic: Traffic) -> Exchange:
        """The pipeline's Exchange for this attempt: stage requests as instructions."""

        async def run(
            exchange: str,
            sites: Sequence[str],
            request: Callable[[str], SiteRequest],
            accept: Callable[[SiteReply], None],
        ) -> dict[str, Drop]:
            def instruction_for(site: str) -> Instruction:
                r = request(site)
                if not r.train:
                    return Instruction(
                        InstructionKind.STAGE, info.round, {}, {}, info.attempt, r.message, (), exchange
                    )
                traffic.sent += sum(a.nbytes for a in info.model.values())
                return Instruction(
                    InstructionKind.FIT,
                    info.round,
                    info.model,
                    self.fit_config(info.round, site),
                    info.attempt,
                    r.message,
                    r.plan,
                    exchange,
                )

            def on_reply(reply: Reply) -> None:
                faults.reach(info.round, exchange)
                # A count is a site's claim: at most the public bound (absurd: refused as malformed).
                weight = float(reply.num_examples)
                weight = min(weight, self.max_examples) if weight <= MAX_WEIGHT else weight
                if fit := reply.kind is InstructionKind.FIT:  # what can raise, before anything is folded
                    counted = int(min(weight, self.max_examples))
                    received = sum(a.nbytes for a in (reply.update or {}).values())
                accept(SiteReply(reply.site, reply.update, weight, reply.metrics, reply.message))
                if fit:
                    traffic.fit[reply.site] = (reply.metrics, counted)
                    traffic.received += received

            return await self._gather(exchange, list(sites), instruction_for, on_reply)

        return run

    async def _gather(
        self,
        exchange: str,
        sites: list[str],
        instruction_for: Callable[[str], Instruction],
        on_reply: Callable[[Reply], None],
    ) -> dict[str, Drop]:
        return await gather(
            self.transport,
            exchange,
            sites,
            instruction_for,
            on_reply,
            deadline=self.deadlines.current(),
            quorum=math.ceil(q * len(sites)) if (q := self.experiment.federation.quorum) else None,
            grace=self.experiment.federation.grace,
        )

    async def _evaluate(
        self, number: int, sites: list[str]
    ) -> tuple[float | None, float | None, str, dict[str, float]]:
        if self.test_data is not None:
            model = self.strategy.released(self.parameters)
            result = await asyncio.to_thread(self.task.evaluate, model, self.test_data)
            return result.accuracy, result.loss, "central", dict(result.metrics)
        if self.pipeline.withholds_evaluation:
            # Exact federated metrics would be statistics of the sites' data outside the
            # guarantee (and sites with a privacy policy refuse them).
            return None, None, f"none ({self.pipeline.withholds_evaluation})", {}
        instruction = Instruction(
            InstructionKind.EVALUATE,
            number,
            self.strategy.released(self.parameters),
            self._statistics_config,
            exchange="evaluate",
        )
        metrics = EvaluationMetrics(cap=self.max_examples)
        await self._gather("evaluate", sites, lambda s: instruction, metrics.collect)
        return weighted(metrics.accuracy), weighted(metrics.loss), "federated", metrics.means()
