"""Flower half of ``simulation_vs_flower.py``: fedcore's own tasks run as a Flower app.

The ClientApp trains with fedcore's task objects (``build_task``, ``Task.site_data``,
``Task.fit`` with ``TrainSettings``), so a site's work is the very same computation as in
``fedcore.run_simulation``; only the framework around it differs. Parameters travel as an
``ArrayRecord`` holding a list of ndarrays in the model's ``state_dict`` order.

Like for like with fedcore's simulation (``fedcore.engine.Coordinator``):

- Same initial model: ``task.initial_parameters(derive_seed(seed, "init"))``.
- Same training settings: the experiment's ``[task]`` values, else the task's defaults.
- Same sites each round: Flower's ``FedAvg`` samples its nodes as usual (``sample_nodes``),
  and each sampled node is told which site's data to train on, namely the sites fedcore's
  coordinator draws for that round (``fedcore_sample``). Virtual clients hold no state in
  either framework (the data is re-sliced or regenerated per call), so this changes only
  *which* data is used, and with it, both frameworks do exactly the same amount of work
  (it matters for ``synthetic``, whose device sizes are log-normal: some hold 100x more).
- Same data order: ``derive_seed(seed, "train", round, "site-K")``.
- Same evaluation: centralised, on ``task.test_data(...)``, through the strategy's
  ``evaluate_fn`` (Flower also evaluates the initial model, as round 0). No federated
  evaluation (``fraction_evaluate=0``), as fedcore evaluates centrally when a task has a
  test split.

Import this module by name (do not run it as ``__main__``): the ClientApp is pickled to Ray
actors with each message, and functions from an importable module are pickled by reference,
so ``cached_task`` and its cache live in the actor's own copy of this module, and each actor
builds its task (and cuts the partition) once, as fedcore's workers do. The caller puts this
directory on ``PYTHONPATH`` so that Ray's workers can import it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from fedcore.config import Experiment, StrategyName, load_experiment
from fedcore.seeding import derive_seed, rng
from fedcore.simulation.runners import cores, set_threads, site_name
from fedcore.tasks import Task, TrainSettings, build_task, default_partition

if TYPE_CHECKING:
    from flwr.app import ConfigRecordValues

from environment import quiet_flower

Emit = Callable[[dict[str, Any]], None]

# Per process (the driver and each Ray actor): task name and model -> (task, state_dict keys).
_TASKS: dict[tuple[str, str], tuple[Task, list[str]]] = {}


def cached_task(name: str, model: str) -> tuple[Task, list[str]]:
    """The task and its parameter names in state_dict order (built once per process)."""
    if (name, model) not in _TASKS:
        task = build_task(name, model)
        _TASKS[name, model] = (task, list(task.initial_parameters(0)))
    return _TASKS[name, model]


def fedcore_sample(experiment: Experiment, number: int) -> list[int]:
    """The sites (1-based) fedcore's Coordinator samples in round `number` (first attempt,
    every site available); mirrors ``Coordinator._sample``."""
    n = experiment.simulation.sites
    names = sorted(site_name(k) for k in range(1, n + 1))  # sorted as strings, as fedcore does
    per_round = experiment.federation.sites_per_round
    if per_round is None or per_round >= n:
        chosen = names
    else:
        index = rng(experiment.seed, "sample", number, 1).choice(n, size=per_round, replace=False)
        chosen = sorted(names[i] for i in index)
    return [int(s.removeprefix("site-")) for s in chosen]


def train_config(experiment: Experiment, task: Task) -> dict[str, ConfigRecordValues]:
    """What every sampled client needs to know (fedcore's TaskSpec plus ``fit_config``)."""
    if experiment.strategy.name is not StrategyName.FEDAVG:
        raise ValueError("the Flower side implements FedAvg only")
    t, defaults = experiment.task, task.defaults
    return {
        "task": t.name,
        "model": task.model,
        "partition": experiment.data.partition or default_partition(task),
        "seed": experiment.seed,
        "partitions": experiment.simulation.sites,
        "local_epochs": t.local_epochs or defaults["local_epochs"],
        "batch_size": t.batch_size or defaults["batch_size"],
        "lr": t.lr or defaults["lr"],
        "weight_decay": t.weight_decay if t.weight_decay is not None else defaults["weight_decay"],
    }


def simulate(overrides: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """Run the experiment given by `overrides` (``Experiment.override`` keywords) in Flower's
    Simulation Runtime (Ray backend). Call only in a fresh interpreter: Ray and Flower keep
    process-global state. `emit` receives progress events; returns the measurements."""
    quiet_flower()

    import flwr
    from flwr.app import (
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MetricRecord,
        RecordDict,
    )
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)  # no per-round INFO lines

    experiment = load_experiment().override(**overrides)
    fed, n = experiment.federation, experiment.simulation.sites
    per_round = fed.sites_per_round or n
    config = train_config(experiment, build_task(experiment.task.name, experiment.task.model))
    task, names = cached_task(str(config["task"]), str(config["model"]))
    initial = task.initial_parameters(derive_seed(experiment.seed, "init"))
    test = task.test_data(seed=experiment.seed, partitions=n)
    if test is None:
        raise ValueError(f"task {experiment.task.name!r} has no central test split")
    history: dict[str, Any] = {"accuracy": {}, "loss": {}, "sampled": {}}

    class SiteFedAvg(FedAvg):
        """Flower's FedAvg; each sampled node is told which site's data to train on."""

        def configure_train(
            self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
        ) -> Iterable[Message]:
            messages = list(super().configure_train(server_round, arrays, config, grid))
            sites = fedcore_sample(experiment, server_round)
            if len(messages) != len(sites):
                raise RuntimeError(f"Flower sampled {len(messages)} nodes, fedcore {len(sites)} sites")
            history["sampled"][server_round] = sites
            return [
                Message(
                    content=RecordDict({"arrays": arrays, "config": ConfigRecord({**config, "site": k})}),
                    message_type=m.metadata.message_type,
                    dst_node_id=m.metadata.dst_node_id,
                )
                for m, k in zip(messages, sites, strict=True)
            ]

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        parameters = dict(zip(names, arrays.to_numpy_ndarrays(), strict=True))
        result = task.evaluate(parameters, test)
        history["accuracy"][server_round] = result.accuracy
        history["loss"][server_round] = result.loss
        emit({"event": "round", "round": server_round, "accuracy": result.accuracy})
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss})

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        strategy = SiteFedAvg(
            fraction_train=per_round / n,
            fraction_evaluate=0.0,  # central evaluation only, as fedcore does
            min_train_nodes=per_round,
            min_evaluate_nodes=0,
            min_available_nodes=n,
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord([initial[k] for k in names]),
            num_rounds=fed.rounds,
            train_config=ConfigRecord(config),
            evaluate_fn=central_evaluation,
        )
        history["done"] = True

    workers = cores()  # fedcore's default number of workers
    backend_config: dict[str, dict[str, ConfigRecordValues]] = {
        "client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},  # one actor per core
        "init_args": {
            "num_cpus": workers,
            "logging_level": "ERROR",
            "log_to_driver": True,  # keep ClientApp tracebacks visible (in the child's log)
            "include_dashboard": False,
        },
    }
    emit({"event": "start"})
    started = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=make_client_app(),
        num_supernodes=n,
        backend_name="ray",
        backend_config=backend_config,
    )
    seconds = time.perf_counter() - started
    if not history.get("done") or len(history["accuracy"]) != fed.rounds + 1:
        raise RuntimeError("the ServerApp did not finish every round (see Flower's errors in the log)")
    rounds = range(1, fed.rounds + 1)
    return {
        "run_seconds": seconds,
        "final_accuracy": history["accuracy"][fed.rounds],
        "final_loss": history["loss"][fed.rounds],
        "initial_accuracy": history["accuracy"][0],
        "accuracy_per_round": [history["accuracy"][r] for r in rounds],
        "sampled_per_round": [history["sampled"][r] for r in rounds],
        "ray_num_cpus": workers,
        "client_num_cpus": 1.0,
        "flower_version": flwr.__version__,
    }


def make_client_app() -> Any:
    """The ClientApp: one site's local training with fedcore's task."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        if torch.get_num_threads() != 1:  # an actor holds one CPU; as fedcore's workers
            set_threads(1)
        cfg = msg.content.config_records["config"]
        task, names = cached_task(str(cfg["task"]), str(cfg["model"]))
        parameters = dict(zip(names, msg.content.array_records["arrays"].to_numpy_ndarrays(), strict=True))
        k, n, seed = _int(cfg, "site"), _int(cfg, "partitions"), _int(cfg, "seed")
        data = task.site_data(f"builtin:{k}/{n}", partition=str(cfg["partition"]), seed=seed, partitions=n)
        settings = TrainSettings(
            local_epochs=_int(cfg, "local_epochs"),
            batch_size=_int(cfg, "batch_size"),
            lr=_float(cfg, "lr"),
            seed=derive_seed(seed, "train", _int(cfg, "server-round"), site_name(k)),
            weight_decay=_float(cfg, "weight_decay"),
        )
        outcome = task.fit(parameters, data, settings)
        metrics = MetricRecord({"num-examples": outcome.num_examples, **outcome.metrics})
        arrays = ArrayRecord([outcome.parameters[name] for name in names])
        return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app


def _int(config: Mapping[str, object], key: str) -> int:
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"config {key!r} must be an integer, got {value!r}")
    return value


def _float(config: Mapping[str, object], key: str) -> float:
    value = config[key]
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"config {key!r} must be a number, got {value!r}")
    return float(value)
