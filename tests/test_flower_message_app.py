"""A Flower ClientApp in the Message API (simulations/flower_message_app.py, logistic
regression in numpy as in Flower's quickstarts) gives the same final arrays in Flower's own
simulation (`flwr.serverapp.strategy.FedAvg`) and in fedcore with the same initial arrays,
to 1e-9; array names are kept; it also runs over gRPC.

Run as a script, this file is the Flower half: a fresh interpreter (Ray and Flower keep
process-global state) that prints the final arrays as a JSON line."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SIMULATIONS = Path(__file__).resolve().parents[1] / "simulations"
TASK = "flower:flower_message_app:app"
INITIAL = "flower_message_app:initial_arrays"
SITES, ROUNDS = 3, 3
TRAIN = {"lr": 0.5, "local_epochs": 5}


def _flower() -> dict[str, list[float]]:
    from flower_message_app import app as client_app
    from flower_message_app import initial_arrays
    from flwr.app import ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    out: dict[str, list[float]] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=SITES, min_available_nodes=SITES)
        result = strategy.start(
            grid=grid, initial_arrays=initial_arrays(), num_rounds=ROUNDS, train_config=ConfigRecord(TRAIN)
        )
        out.update({name: array.numpy().ravel().tolist() for name, array in result.arrays.items()})

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=SITES,
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 1, "logging_level": "ERROR", "include_dashboard": False},
        },
    )
    return out


if __name__ == "__main__":  # the Flower half needs only the imports above
    print(json.dumps(_flower()), flush=True)
    sys.exit(0)


from fedcore import load_experiment, run_simulation  # noqa: E402
from fedcore.config import Experiment  # noqa: E402
from tests.integration.test_grpc_rounds import federation  # noqa: E402
from tests.support.flower_script import run_flower_script  # noqa: E402


@pytest.fixture(autouse=True)
def _importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(SIMULATIONS))


def experiment() -> Experiment:
    return load_experiment().override(
        task__name=TASK,
        task__initial=INITIAL,
        **{f"task__{k}": v for k, v in TRAIN.items()},
        simulation__sites=SITES,
        simulation__workers=1,
        federation__min_sites=SITES,
        federation__rounds=ROUNDS,
    )


def run_flower() -> dict[str, Any]:
    return run_flower_script(__file__)


@pytest.mark.slow
def test_a_message_api_client_app_matches_flowers_own_simulation() -> None:
    ours, _ = run_simulation(experiment(), None)
    assert list(ours.parameters) == ["weights", "bias"]  # the app's own array names
    assert ours.records[-1].accuracy is not None and ours.records[-1].accuracy > 0.95  # its eval_acc
    named = ours.records[-1].eval_metrics  # every evaluation metric, under the app's own names
    assert set(named) == {"eval_acc", "eval_loss"} and named["eval_acc"] == ours.records[-1].accuracy
    theirs = run_flower()
    for name, value in theirs.items():
        np.testing.assert_allclose(ours.parameters[name].ravel(), value, rtol=0, atol=1e-9)


def test_a_client_app_needs_its_initial_model() -> None:
    from fedcore.errors import ConfigError
    from fedcore.simulation.run import check_simulation

    with pytest.raises((ValueError, ConfigError), match="initial"):
        run_simulation(experiment().override(task__initial="flower_message_app:no_such_function"), None)
    missing = load_experiment().override(task__name=TASK, simulation__sites=SITES)
    with pytest.raises((ValueError, ConfigError), match=r"\[task\] initial"):
        check_simulation(missing)


def test_a_client_app_runs_over_grpc(tmp_path: Path) -> None:
    from fedcore.client.agent import AgentSettings, Outcome, SiteAgent
    from fedcore.tasks import build_task

    def agent(port: int, k: int) -> SiteAgent:
        settings = AgentSettings(
            server=f"127.0.0.1:{port}",
            task_name=TASK,
            data_uri=f"builtin:{k}/{SITES}",
            tls=None,
            site_name=f"site-{k}",
        )
        return SiteAgent(settings, build_task(TASK))  # its initial model comes in the Welcome

    async def sites(port: int) -> list[object]:
        return list(await asyncio.gather(*(agent(port, k).run() for k in range(1, SITES + 1))))

    result, outcomes = asyncio.run(federation(experiment(), tmp_path, sites))
    assert outcomes == [Outcome.COMPLETED] * SITES
    assert set(result.records[-1].eval_metrics) == {"eval_acc", "eval_loss"}  # they cross the wire
    simulated, _ = run_simulation(experiment(), None)
    for name, value in simulated.parameters.items():
        np.testing.assert_allclose(result.parameters[name], value, rtol=0, atol=1e-12)
