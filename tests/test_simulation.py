"""Simulation for researchers: reproducible whatever the workers or backend, seeded
heterogeneity, and virtual sites whose memory does not grow with the federation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedcore import load_experiment, run_simulation
from fedcore.aggregation import DropReason
from fedcore.config import Experiment


def metrics(directory: Path) -> list[dict[str, object]]:
    rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("seconds")
    return rows


def small(**overrides: object) -> Experiment:
    settings: dict[str, object] = {"federation__rounds": 3, "simulation__sites": 6, **overrides}
    return load_experiment().override(**settings)


@pytest.mark.slow
def test_one_and_two_workers_give_bit_identical_results(tmp_path: Path) -> None:
    experiment = small(task__name="digits", federation__sites_per_round=4, task__local_epochs=1)
    run_simulation(experiment.override(simulation__workers=1), tmp_path / "w1")
    run_simulation(experiment.override(simulation__workers=2), tmp_path / "w2")
    assert metrics(tmp_path / "w1") == metrics(tmp_path / "w2")
    assert (tmp_path / "w1" / "model.safetensors").read_bytes() == (
        tmp_path / "w2" / "model.safetensors"
    ).read_bytes()


@pytest.mark.slow
# Ray leaves /dev/null handles open when it shuts down; that is Ray's, not fedcore's.
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_ray_backend_gives_the_same_model_as_the_local_backend(tmp_path: Path) -> None:
    experiment = small(simulation__workers=2)
    local, _ = run_simulation(experiment, tmp_path / "local")
    ray, _ = run_simulation(experiment.override(simulation__backend="ray"), tmp_path / "ray")
    for name, value in local.parameters.items():
        np.testing.assert_array_equal(ray.parameters[name], value)
    assert metrics(tmp_path / "local") == metrics(tmp_path / "ray")


def test_dropout_is_seeded_and_leaves_the_round_to_the_rest() -> None:
    experiment = small(simulation__dropout=0.4, simulation__workers=1, federation__rounds=4)
    first, _ = run_simulation(experiment, None)
    again, _ = run_simulation(experiment, None)
    dropped = [r.dropped for r in first.records]
    assert dropped == [r.dropped for r in again.records]
    assert any(dropped) and all(
        drop.reason is DropReason.UNAVAILABLE and drop.detail.startswith("dropped out")
        for d in dropped
        for drop in d.values()
    )
    assert all(r.sites == 6 - len(r.dropped) for r in first.records)
    other, _ = run_simulation(experiment.override(data__seed=1), None)
    assert [r.dropped for r in other.records] != dropped


def test_stragglers_are_dropped_by_fedavg_and_kept_with_partial_work_by_fedprox() -> None:
    experiment = small(simulation__stragglers=0.5, simulation__workers=1, federation__rounds=4)
    fedavg, _ = run_simulation(experiment, None)
    stragglers = [set(r.dropped) for r in fedavg.records]
    assert any(stragglers)
    assert all("straggler" in drop.detail for r in fedavg.records for drop in r.dropped.values())
    fedprox, _ = run_simulation(
        experiment.override(strategy__name="fedprox", strategy__proximal_mu=0.1), None
    )
    assert all(r.dropped == {} and r.sites == 6 for r in fedprox.records)


@pytest.mark.slow
def test_ten_thousand_virtual_sites_need_memory_for_the_sampled_ones_only(tmp_path: Path) -> None:
    import psutil

    experiment = load_experiment().override(
        task__name="synthetic",
        task__local_epochs=1,
        simulation__sites=10_000,
        federation__sites_per_round=100,
        federation__min_sites=100,
        federation__rounds=2,
        simulation__workers=2,
    )
    result, summary = run_simulation(experiment, tmp_path)
    assert [r.sites for r in result.records] == [100, 100]
    peak = summary["peak_memory_bytes"]
    assert peak < 3 * 2**30, peak
    assert psutil.Process().memory_info().rss < 3 * 2**30


def test_a_retried_round_draws_its_dropouts_afresh() -> None:
    experiment = small(
        simulation__dropout=0.6,
        simulation__workers=1,
        federation__rounds=4,
        federation__min_sites=3,
        federation__max_round_retries=10,
    )
    result, _ = run_simulation(experiment, None)
    assert any(r.attempt > 1 for r in result.records)  # a short round was retried ...
    assert all(r.sites >= 3 for r in result.records)  # ... and completed with new draws
