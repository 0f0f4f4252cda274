"""The issue's utility bar: `fedcore simulate` with dirichlet:0.5 reaches 0.95 within 20 rounds."""

from __future__ import annotations

import pytest

from fedcore import load_experiment, run_simulation


@pytest.mark.slow
@pytest.mark.parametrize("task", ["breast_cancer", "digits"])
def test_simulate_reaches_95_percent_within_20_rounds(task: str) -> None:
    experiment = load_experiment().override(
        task__name=task, data__partition="dirichlet:0.5", federation__rounds=20
    )
    result, summary = run_simulation(experiment, None)
    accuracies = [r.accuracy for r in result.records]
    assert len(accuracies) == 20
    assert summary["final_accuracy"] >= 0.95, accuracies
