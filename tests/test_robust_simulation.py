"""Robust aggregation end to end: a simulated federation where a fifth of each round's sites
lie (they send -10 x their honest update). The plain mean is dragged off; the robust rules
keep the model, and each round records whom they left out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcore import load_experiment, run_simulation

ATTACKED = {
    "task__name": "breast_cancer",
    "simulation__sites": 10,
    "simulation__workers": 1,
    "data__partition": "iid",
    "federation__rounds": 20,
    "simulation__byzantine": 0.2,
    "simulation__byzantine_attack": "sign_flip",
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rule", "extra", "floor"),
    [
        ("median", {}, 0.93),
        ("trimmed_mean", {"aggregation__trim": 0.2}, 0.93),
        ("krum", {"aggregation__byzantine": 2}, 0.90),
    ],
)
def test_robust_rules_hold_where_the_mean_breaks(
    rule: str, extra: dict[str, object], floor: float, tmp_path: Path
) -> None:
    experiment = load_experiment().override(**ATTACKED, aggregation__rule=rule, **extra)
    result, _ = run_simulation(experiment, tmp_path)
    assert result.records[-1].accuracy is not None and result.records[-1].accuracy >= floor
    rows = [json.loads(line) for line in (tmp_path / "sites.jsonl").read_text().splitlines()]
    if rule == "krum":  # Krum keeps one update: the other nine were left out, every round
        assert all(sum(r["trimmed"] for r in rows if r["round"] == n) == 9 for n in range(1, 21))


@pytest.mark.slow
def test_the_plain_mean_is_broken_by_the_same_attack() -> None:
    result, _ = run_simulation(load_experiment().override(**ATTACKED), None)
    assert result.records[-1].accuracy is not None and result.records[-1].accuracy < 0.8
