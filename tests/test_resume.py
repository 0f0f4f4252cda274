"""Crash and resume: the run's state as a value, saved with every round; a run killed at any
point continues from its last completed round and ends where the uninterrupted run ends."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedcore import load_experiment, run_simulation
from fedcore.config import Experiment
from fedcore.engine import RoundRecord, RunState
from fedcore.engine.runs import open_run
from fedcore.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


class Crash(Exception):
    """Raised by an observer after a round is committed: the process 'dies' there."""


class CrashAfter:
    def __init__(self, round_number: int) -> None:
        self.round = round_number

    def record(self, record: RoundRecord, state: RunState) -> None:
        if record.round == self.round:
            raise Crash


def experiment(**overrides: object) -> Experiment:
    settings: dict[str, object] = {
        "federation__rounds": 5,
        "simulation__sites": 4,
        "simulation__workers": 1,
        "privacy__secure_rng": False,  # reproducible noise: tests only
        "privacy__noise_multiplier": 1.0,
        **overrides,
    }
    return load_experiment().override(**settings)


def interrupted(e: Experiment, out: Path, after: int) -> tuple[Any, dict[str, Any]]:
    """Run `e` in `out`, 'crash' after round `after` is stored, resume, run to the end."""
    with pytest.raises(Crash):
        run_simulation(e, out, observers=[CrashAfter(after)])
    return run_simulation(e, out, resume=True)


def metrics(out: Path) -> list[dict[str, Any]]:
    """The metrics view's rounds (none yet: no file)."""
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_run_state_round_trips_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    state = RunState(
        run_id="r1",
        round=7,
        parameters={"fc.weight": rng.standard_normal((3, 2)).astype(np.float32), "b": np.zeros(0)},
        strategy={"m": {"fc.weight": rng.standard_normal((3, 2))}, "steps": {"steps": np.array([7])}},
        pipeline={"central_noise": {"history": [[1.1, 0.1 + 0.2, 3]], "clip": math.pi, "none": None}},
        stopped=None,
        roster=["site-1", "site-2"],
        transport={"1": {"ledger": {}}},
        excluded={"site-9": "round 3: bad reply"},
    )
    back = RunState.from_bytes(state.to_bytes())
    assert back.excluded == state.excluded
    assert (
        back.pipeline == state.pipeline and back.roster == state.roster and back.transport == state.transport
    )
    for got, want in ((back.parameters, state.parameters), (back.strategy["m"], state.strategy["m"])):
        for k in want:
            assert got[k].dtype == want[k].dtype
            np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(ConfigError, match="unreadable"):
        RunState.from_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # FedAvg, no DP: bit-identical
        {"strategy__name": "fedadam", "strategy__server_lr": 0.05},  # the strategy's moments resume
        {"privacy__mode": "user-central", "federation__sites_per_round": 2, "federation__min_sites": 1},
        {"privacy__mode": "sample"},  # the virtual sites' ledgers resume with the run
    ],
    ids=["fedavg", "fedadam", "user-central", "sample"],
)
def test_a_resumed_simulation_ends_with_the_uninterrupted_model_and_epsilon(
    overrides: dict[str, object], tmp_path: Path
) -> None:
    e = experiment(**overrides)
    whole, whole_summary = run_simulation(e, tmp_path / "whole")
    resumed, summary = interrupted(e, tmp_path / "resumed", after=2)
    for name, value in whole.parameters.items():
        np.testing.assert_array_equal(resumed.parameters[name], value)
    assert [m["round"] for m in metrics(tmp_path / "resumed")] == [1, 2, 3, 4, 5]
    for a, b in zip(whole.records, resumed.records, strict=True):
        assert (a.round, a.accuracy, a.sampled) == (b.round, b.accuracy, b.sampled)
        if a.epsilon is not None:
            assert b.epsilon == pytest.approx(a.epsilon, abs=1e-9)
        assert b.site_epsilon == pytest.approx(a.site_epsilon, abs=1e-9)  # no site charged twice
    assert (tmp_path / "resumed" / "model.safetensors").read_bytes() == (
        tmp_path / "whole" / "model.safetensors"
    ).read_bytes()
    if "privacy" in whole_summary:
        assert summary["privacy"]["epsilon"] == pytest.approx(whole_summary["privacy"]["epsilon"], abs=1e-9)


def test_resume_refuses_another_experiment_and_extends_with_more_rounds(tmp_path: Path) -> None:
    e = experiment(federation__rounds=2)
    run_simulation(e, tmp_path)
    with pytest.raises(ConfigError, match=r"holds run .* continue it with --resume"):
        run_simulation(e, tmp_path)
    with pytest.raises(ConfigError, match=r"\[task\] lr is 0.5, the run has"):
        run_simulation(e.override(task__lr=0.5), tmp_path, resume=True)
    with pytest.raises(ConfigError, match=r"\[federation\] rounds is 1, the run has 2"):
        run_simulation(e.override(federation__rounds=1), tmp_path, resume=True)
    done, _ = run_simulation(e, tmp_path, resume=True)  # complete: nothing to do
    assert len(done.records) == 2
    extended, _ = run_simulation(
        e.override(federation__rounds=4, simulation__workers=2), tmp_path, resume=True
    )
    assert [m["round"] for m in metrics(tmp_path)] == [1, 2, 3, 4]
    whole, _ = run_simulation(e.override(federation__rounds=4), tmp_path / "whole")
    for name, value in whole.parameters.items():
        np.testing.assert_array_equal(extended.parameters[name], value)
    recorded = json.loads((tmp_path / "experiment.json").read_text())
    assert recorded["experiment"]["federation"]["rounds"] == 4


def test_a_second_process_on_a_state_directory_in_use_is_refused(tmp_path: Path) -> None:
    opened = open_run(tmp_path, experiment(), resume=False)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fedcore", "simulate", "--resume", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        opened.close()
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("fedcore: error: state directory")
    assert "in use by another fedcore process" in done.stderr


# --- real processes killed with SIGKILL at each point of a round ---------------------------

PLAIN = ["--rounds", "4", "--sites", "3", "--workers", "2"]
SECURE = [*PLAIN, "--secure-aggregation"]
# (name, flags, crash point): a small set here; simulations/fault_injection.py runs every point.
FAULTS = [
    ("plain", PLAIN, "3:fit"),
    ("plain", PLAIN, "3:before_commit"),
    ("secure", SECURE, "2:share_keys"),
    ("secure", SECURE, "3:unmask"),
]


def simulate(args: list[str], out: Path, crash_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FEDCORE_CRASH_AT", None)
    if crash_at:
        env["FEDCORE_CRASH_AT"] = crash_at
    command = [sys.executable, "-m", "fedcore", "simulate", *args]
    command += ["--resume", str(out)] if not args else ["--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("uninterrupted")
    out = {}
    for name, flags in (("plain", PLAIN), ("secure", SECURE)):
        done = simulate(flags, d / name)
        assert done.returncode == 0, done.stderr[-2000:]
        out[name] = d / name
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("name", "flags", "crash_at"), FAULTS, ids=[f"{n}-{c}" for n, _, c in FAULTS])
def test_a_simulation_killed_at_a_point_of_a_round_resumes_to_the_same_model(
    name: str, flags: list[str], crash_at: str, uninterrupted: dict[str, Path], tmp_path: Path
) -> None:
    killed = simulate(flags, tmp_path, crash_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    crashed_in = int(crash_at.split(":")[0])
    # A run without DP writes a round while the next one runs: the last may not be durable.
    stored = [m["round"] for m in metrics(tmp_path)]
    assert stored in (list(range(1, crashed_in)), list(range(1, crashed_in - 1)))
    resumed = simulate([], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [m["round"] for m in metrics(tmp_path)] == [1, 2, 3, 4]
    want = load_file(str(uninterrupted[name] / "model.safetensors"))
    got = load_file(str(tmp_path / "model.safetensors"))
    for key, value in want.items():
        if name == "plain":
            np.testing.assert_array_equal(got[key], value)
        else:  # the secure sum's stochastic rounding, at the masked weights' precision (32 bits)
            np.testing.assert_allclose(got[key], value, atol=1e-4)


def test_a_run_with_a_target_epsilon_is_not_extended(tmp_path: Path) -> None:
    """Its noise was calibrated for its rounds: more rounds would overshoot the target."""
    targeted = load_experiment().override(
        federation__rounds=2,
        simulation__sites=4,
        simulation__workers=1,
        privacy__mode="user-central",
        privacy__target_epsilon=50.0,
        privacy__secure_rng=False,
    )
    run_simulation(targeted, tmp_path)
    with pytest.raises(ConfigError, match="cannot be extended"):
        run_simulation(targeted.override(federation__rounds=3), tmp_path, resume=True)
