"""`fedcore simulate`: the deployment's rounds with virtual sites and the in-process transport."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fedcore.aggregation.builder import pipeline_for
from fedcore.aggregation.statistics import statistics_pipeline_for
from fedcore.config import Experiment
from fedcore.engine import Coordinator, MemoryStore, RoundRecord, RoundStore, RunResult
from fedcore.engine.records import FanOutStore
from fedcore.engine.runs import OpenedRun, open_run
from fedcore.errors import ConfigError
from fedcore.seeding import derive_seed
from fedcore.simulation.inprocess import InProcessTransport
from fedcore.simulation.memory import PeakMemory
from fedcore.simulation.report import plot_report, write_summary
from fedcore.simulation.runners import make_runner, make_site, set_threads
from fedcore.strategies import build_strategy
from fedcore.tasks import Task, default_partition, task_for, with_task_defaults
from fedcore.tracking import Tracker


def check_simulation(experiment: Experiment) -> Task:
    """The experiment's task, once it is clear the simulation can run; ConfigError says why not."""
    if experiment.simulation.sites < experiment.federation.min_sites:
        raise ConfigError(
            f"[simulation] sites ({experiment.simulation.sites}) must be >= [federation] min_sites "
            f"({experiment.federation.min_sites}); lower min_sites or add sites"
        )
    try:
        task = task_for(experiment)
        make_site(experiment, 1)  # the partition fits the task and the number of sites
    except ValueError as err:
        raise ConfigError(str(err)) from None
    pipeline_for(experiment, task)  # the stages fit the task
    statistics_pipeline_for(experiment, task)
    return task


def run_simulation(
    experiment: Experiment,
    out: Path | None,
    *,
    device: str | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    observers: Sequence[RoundStore] = (),
    resume: bool = False,
    command: dict[str, Any] | None = None,
    trackers: Sequence[Tracker] = (),
) -> tuple[RunResult, dict[str, Any]]:
    """Run the experiment. With `out`, the run is durable there (run.db, with the views
    metrics.jsonl, sites.jsonl and model.safetensors; summary.json and report.png at the
    end), and `resume` continues the run stored in `out`. `observers` also see every
    round's record and the run's state after it. Returns the result and the summary."""
    started = time.perf_counter()
    set_threads(1)  # see fedcore.simulation.runners: workers give the parallelism
    experiment = with_task_defaults(experiment)
    task = check_simulation(experiment)
    if device is not None:
        task.device = torch.device(device)  # type: ignore[attr-defined]
    opened: OpenedRun | None = None
    if out is not None:
        opened = open_run(out, experiment, resume=resume, command=command)
    try:
        if opened is not None and opened.complete:
            summary, result = _finished(experiment, task, opened, started)
        else:
            result, summary = _run(experiment, task, opened, device, on_round, observers, trackers, started)
        if opened is not None:
            opened.store.finish()
    finally:
        if opened is not None:
            opened.close()
    if out is not None:
        write_summary(out / "summary.json", summary)
        if result.records:
            plot_report(
                result.records,
                out / "report.png",
                title=f"{experiment.task.name}: {experiment.simulation.sites} sites, {summary['strategy']}",
            )
    return result, summary


def _finished(
    experiment: Experiment, task: Task, opened: OpenedRun, started: float
) -> tuple[dict[str, Any], RunResult]:
    """The summary and result of a run that was already complete."""
    pipeline = pipeline_for(experiment, task)
    if opened.state is None:  # it ended before its first round (a stage stopped it)
        result = RunResult(task.initial_parameters(derive_seed(experiment.seed, "init")), [])
    else:
        pipeline.load_state_dict(opened.state.pipeline)
        result = RunResult(opened.state.parameters, opened.history, opened.state.stopped)
    return _summary(experiment, task, result, started, None) | pipeline.summary(), result


def _run(
    experiment: Experiment,
    task: Task,
    opened: OpenedRun | None,
    device: str | None,
    on_round: Callable[[RoundRecord], None] | None,
    observers: Sequence[RoundStore],
    trackers: Sequence[Tracker],
    started: float,
) -> tuple[RunResult, dict[str, Any]]:
    strategy = build_strategy(experiment.strategy)
    transport = InProcessTransport(
        experiment, make_runner(experiment, device), accepts_partial_work=strategy.accepts_partial_work
    )
    store = FanOutStore([opened.store if opened is not None else MemoryStore(), *observers, *trackers])
    coordinator = Coordinator(
        experiment=experiment,
        task=task,
        transport=transport,
        store=store,
        test_data=task.test_data(seed=experiment.seed, partitions=experiment.simulation.sites),
        strategy=strategy,
        on_round=on_round,
        run_id=opened.run_id if opened is not None else None,
        resume=opened.state if opened is not None else None,
        history=opened.history if opened is not None else (),
    )
    for tracker in trackers:
        tracker.start(experiment, coordinator.run_id, coordinator.records)
    completed = False
    try:
        with PeakMemory() as peak:
            result = asyncio.run(coordinator.run())
        completed = True
    finally:
        for tracker in trackers:
            tracker.finish(result.parameters if completed else None, completed=completed)
    return result, _summary(experiment, task, result, started, peak) | coordinator.pipeline.summary()


def _summary(
    experiment: Experiment, task: Task, result: RunResult, started: float, peak: PeakMemory | None
) -> dict[str, Any]:
    last = result.records[-1] if result.records else None  # none: the target epsilon allowed no round
    return {
        "task": experiment.task.name,
        "model": task.model,
        "strategy": experiment.strategy.name.value,
        "partition": experiment.data.partition or default_partition(task),
        "seed": experiment.seed,
        "sites": experiment.simulation.sites,
        "rounds": len(result.records),
        # rounds whose every attempt's result was rejected unattributably (a site lying under
        # the mask): the model did not move in them
        "skipped_rounds": [r.round for r in result.records if r.skipped],
        "final_accuracy": last.accuracy if last else None,
        "final_loss": last.loss if last else None,
        "best_accuracy": max((r.accuracy for r in result.records if r.accuracy is not None), default=None),
        "wall_seconds": time.perf_counter() - started,
        # The whole process tree (this process and its workers): PSS, and RSS as an upper bound.
        "peak_memory_bytes": peak.bytes if peak else None,
        "peak_rss_bytes": peak.rss_bytes if peak else None,
        "bytes_sent_per_round": [r.bytes_sent for r in result.records],
        "bytes_received_per_round": [r.bytes_received for r in result.records],
    }
