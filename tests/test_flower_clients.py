"""Flower clients hosted as fedcore sites (`flower:MODULE:ATTR`): the same NumPyClient
(simulations/flower_client_example.py) gives the same model, losses and training metrics in
Flower's own simulation (Ray backend, FedAvg) as in `fedcore simulate` and over gRPC.

Run as a script, this file is the Flower half: a fresh interpreter (Ray and Flower keep
process-global state) that prints the result as a JSON line."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SIMULATIONS = Path(__file__).resolve().parents[1] / "simulations"
TASK = "flower:flower_client_example:client_fn"
SITES, ROUNDS = 3, 3
TRAIN = {"local_epochs": 2, "batch_size": 16, "lr": 0.1, "weight_decay": 0.001}


def _flower(initial_path: str) -> dict[str, Any]:
    """Flower's simulation of the example client (run in a fresh interpreter)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from flower_client_example import client_fn
    from flwr.client import ClientApp
    from flwr.common import Metrics, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.ERROR)
    with np.load(initial_path) as f:
        initial = [f[k] for k in sorted(f.files)]
    out: dict[str, Any] = {"losses": [], "train_losses": []}

    def mean_of(name: str) -> Any:
        def aggregate(metrics: list[tuple[int, Metrics]]) -> Metrics:
            total = sum(n for n, _ in metrics)
            return {name: sum(n * float(m[name]) for n, m in metrics) / total}

        return aggregate

    class Recording(FedAvg):
        def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
            parameters, metrics = super().aggregate_fit(server_round, results, failures)
            out["final"] = [a.tolist() for a in parameters_to_ndarrays(parameters)]
            out["train_losses"].append(metrics["train_loss"])
            return parameters, metrics

        def aggregate_evaluate(self, server_round, results, failures):  # type: ignore[no-untyped-def]
            loss, metrics = super().aggregate_evaluate(server_round, results, failures)
            out["losses"].append(loss)
            return loss, metrics

    strategy = Recording(
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=SITES,
        min_evaluate_clients=SITES,
        min_available_clients=SITES,
        initial_parameters=ndarrays_to_parameters(initial),
        on_fit_config_fn=lambda server_round: dict(TRAIN),
        fit_metrics_aggregation_fn=mean_of("train_loss"),
        evaluate_metrics_aggregation_fn=mean_of("accuracy"),
    )
    server_app = ServerApp(
        server_fn=lambda context: ServerAppComponents(
            strategy=strategy, config=ServerConfig(num_rounds=ROUNDS)
        )
    )
    run_simulation(
        server_app=server_app,
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=SITES,
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 1, "logging_level": "ERROR", "include_dashboard": False},
        },
    )
    return out


def run_flower(initial_path: Path) -> dict[str, Any]:
    return run_flower_script(__file__, str(initial_path))


if __name__ == "__main__":  # the Flower half needs only the imports above
    print(json.dumps(_flower(sys.argv[1])), flush=True)
    sys.exit(0)


from fedcore import load_experiment  # noqa: E402
from fedcore.client.agent import AgentSettings, Outcome, SiteAgent  # noqa: E402
from fedcore.config import Experiment  # noqa: E402
from fedcore.engine import RunResult  # noqa: E402
from fedcore.seeding import derive_seed  # noqa: E402
from fedcore.simulation import run_simulation  # noqa: E402
from fedcore.tasks import build_task  # noqa: E402
from fedcore.tasks.flower import FlowerTask, names  # noqa: E402
from tests.integration.test_grpc_rounds import federation  # noqa: E402
from tests.support.flower_script import run_flower_script  # noqa: E402


@pytest.fixture(autouse=True)
def _importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(SIMULATIONS))


def experiment() -> Experiment:
    return load_experiment().override(
        task__name=TASK,
        **{f"task__{k}": v for k, v in TRAIN.items()},
        simulation__sites=SITES,
        simulation__workers=1,
        federation__min_sites=SITES,
        federation__rounds=ROUNDS,
    )


@pytest.fixture(scope="module")
def fedcore_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResult, Path]:
    out = tmp_path_factory.mktemp("flower-sim")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(SIMULATIONS))
        result, _ = run_simulation(experiment(), out)
    return result, out


@pytest.mark.slow
def test_fedcore_hosting_matches_flowers_own_simulation(
    fedcore_run: tuple[RunResult, Path], tmp_path: Path
) -> None:
    exp = experiment()
    initial = build_task(TASK).initial_parameters(derive_seed(exp.seed, "init"))
    np.savez(tmp_path / "initial.npz", **initial)
    flower = run_flower(tmp_path / "initial.npz")

    result, _ = fedcore_run
    ours = [result.parameters[k] for k in sorted(result.parameters)]
    assert len(ours) == len(flower["final"]) == 2
    for mine, theirs in zip(ours, flower["final"], strict=True):
        np.testing.assert_allclose(mine, np.asarray(theirs), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose([r.loss for r in result.records], flower["losses"], rtol=1e-6)
    np.testing.assert_allclose([r.train_loss for r in result.records], flower["train_losses"], rtol=1e-6)
    assert any(float(np.abs(a - initial[k]).max()) > 1e-3 for k, a in result.parameters.items())


def test_client_metrics_land_in_metrics_jsonl(fedcore_run: tuple[RunResult, Path]) -> None:
    _, out = fedcore_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    for row in rows:
        assert row["evaluation"] == "federated" and row["sites"] == SITES
        assert 0 < row["train_loss"] < 1 and 0 < row["loss"] < 1 and 0.8 < row["accuracy"] <= 1
    assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.integration
def test_flower_client_over_grpc_gives_the_simulations_model(
    fedcore_run: tuple[RunResult, Path], tmp_path: Path
) -> None:
    exp = experiment().override(federation__round_timeout=60.0)

    async def sites(port: int) -> list[object]:
        agents = [
            SiteAgent(
                AgentSettings(
                    server=f"127.0.0.1:{port}",
                    task_name=TASK,
                    data_uri=f"builtin:{k}/{SITES}",
                    tls=None,
                    site_name=f"site-{k}",
                    heartbeat_interval=0.5,
                    give_up_after=10.0,
                ),
                build_task(TASK),
            ).run()
            for k in range(1, SITES + 1)
        ]
        return list(await asyncio.gather(*agents))

    result, outcomes = asyncio.run(federation(exp, tmp_path, sites))
    assert outcomes == [Outcome.COMPLETED] * SITES
    simulated, _ = fedcore_run
    for k, a in simulated.parameters.items():
        np.testing.assert_array_equal(result.parameters[k], a)
    assert [r.loss for r in result.records] == [r.loss for r in simulated.records]


def test_numpy_client_and_parameter_names() -> None:
    task = build_task(TASK)
    assert (
        isinstance(task, FlowerTask)
        and task.model == "flower"
        and task.test_data(seed=0, partitions=3) is None
    )
    initial = task.initial_parameters(7)
    assert list(initial) == ["p0", "p1"] and initial["p0"].shape == (30,)
    np.testing.assert_array_equal(task.initial_parameters(7)["p0"], initial["p0"])  # seeded
    assert names(11)[:2] == ["p00", "p01"] and sorted(names(11)) == names(11)
    data = task.site_data("builtin:2/3", partition="iid", seed=0, partitions=3)
    assert len(data.train) == 0  # the client loads its own data
    evaluation = task.evaluate(initial, data.train)
    assert evaluation.num_examples > 0 and 0 <= evaluation.accuracy <= 1


def test_errors_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="expected flower:MODULE:ATTR"):
        build_task("flower:no_attribute")
    with pytest.raises(ValueError, match=r"on sys\.path"):
        build_task("flower:fedcore_no_such_module:client_fn")
    with pytest.raises(ValueError, match="not a callable"):
        build_task("flower:flower_client_example:SPLIT_SEED")
    with pytest.raises(ValueError, match="builtin:K/N"):
        build_task(TASK).site_data("data.csv", partition="iid", seed=0, partitions=3)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_flower_nodes_context_state_persists_across_rounds(
    workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Virtual sites are rebuilt every round (in any worker); the simulation keeps each
    # site's Context.state and hands it back, as Flower keeps a node's Context.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent / "support"))
    experiment = load_experiment().override(
        task__name="flower:stateful_flower_client:client_fn",
        simulation__sites=2,
        simulation__workers=workers,
        federation__rounds=3,
    )
    result, _ = run_simulation(experiment, None)
    assert [r.fit_metrics["fits"] for r in result.records] == [1.0, 2.0, 3.0]
