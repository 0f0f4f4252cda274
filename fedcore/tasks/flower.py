"""Flower clients hosted as fedcore sites: `[task] name = "flower:MODULE:ATTR"`.

ATTR is a Flower `client_fn(context)` in MODULE returning a `flwr.client.NumPyClient` or a
`flwr.client.Client`, or a `flwr.clientapp.ClientApp` in the Message API (see
`flower_app.py`; its initial model comes from `[task] initial = "MODULE:FUNC"`). MODULE is imported with importlib, so it must be importable where the
task is built (the server, every site, every simulation worker): installed, or on
`sys.path` (PYTHONPATH; the current directory only with `python -m fedcore`, not with the
`fedcore` script). This module adds nothing to `sys.path`.

The client is driven as Flower's simulation drives it:
- Site K of N (`builtin:K/N`) is Flower node K with `node_config = {"partition-id": K - 1,
  "num-partitions": N}`, `run_config = {}`. Its `Context` (and so `context.state`) lives as
  long as this task object: across rounds at a `fedcore client`, and within one worker
  process in `fedcore simulate` (one worker: the whole run).
- `client_fn(context)` is called afresh for every fit and evaluate, as Flower calls it for
  every message; a NumPyClient is wrapped with `.to_client()`.
- `fit` gets the round's training settings as Flower config scalars (`local_epochs`,
  `batch_size`, `lr`, `weight_decay`, `proximal_mu`, `seed`); `evaluate` gets `{}`.
- Parameters: Flower's ordered list of arrays is fedcore's named arrays `p0, p1, ...`
  (zero-padded, so that sorting the names keeps the order).
- The initial model is partition 0's `get_parameters({})`. Before building a client the
  global `random`, `numpy.random` and (when loaded) `torch` generators are seeded: with the
  initial-model seed, and for fit with the round's per-site seed (Flower seeds nothing; a
  client that draws from global generators is then still reproducible under fedcore).
- Fit metrics that are numbers are returned (fedcore records `train_loss`); the evaluation's
  accuracy is the client's `"accuracy"` metric, NaN when it reports none.
- There is no server-side test split: the server evaluates federatedly.
"""

from __future__ import annotations

import importlib
import math
import random
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fedcore.tasks import flower_app
from fedcore.tasks.base import (
    Dataset,
    Evaluation,
    FitOutcome,
    SiteData,
    Task,
    TrainSettings,
    parse_builtin_uri,
)
from fedcore.tensors import Arrays

_EMPTY = np.zeros(0, dtype=np.float32)


@dataclass(frozen=True)
class FlowerPartition(Dataset):
    """A Flower node's data: the client loads it itself, so this holds only which part
    (0-based `partition_id` of `num_partitions`); `x` and `y` are empty."""

    partition_id: int = 0
    num_partitions: int = 1


def load_client_fn(spec: str) -> Callable[[Any], Any]:
    """`MODULE:ATTR` -> the callable; ValueError says why not (and where MODULE must be)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(
            f"bad task 'flower:{spec}'; expected flower:MODULE:ATTR, e.g. flower:my_app:client_fn"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and module_name.startswith(err.name):
            raise ValueError(
                f"cannot import Flower client module {module_name!r}: it must be installed or on "
                "sys.path (add its directory to PYTHONPATH, or run `python -m fedcore` from that directory)"
            ) from None
        raise ValueError(f"Flower client module {module_name!r} failed to import: {err}") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{module_name}.{attr} is not a callable client_fn(context)")
    return fn  # type: ignore[no-any-return]


def new_context(partition_id: int, num_partitions: int) -> Any:
    """The Context Flower's simulation gives node `partition_id + 1` of `num_partitions`."""
    from flwr.app import Context, RecordDict

    return Context(
        run_id=0,
        node_id=partition_id + 1,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config={},
    )


def names(count: int) -> list[str]:
    width = len(str(max(count - 1, 0)))
    return [f"p{i:0{width}d}" for i in range(count)]


def to_named(arrays: list[np.ndarray]) -> Arrays:
    return dict(zip(names(len(arrays)), arrays, strict=True))


def to_list(parameters: Arrays) -> list[np.ndarray]:
    return [parameters[name] for name in names(len(parameters))]


def seed_globals(seed: int) -> None:
    """Seed the generators a Flower client may draw from (torch only if it is loaded), from
    the experiment seed: reproducible training like Flower's, never protocol secrets."""
    random.seed(seed)  # experiment seed for a hosted client's own draws: not protocol randomness
    np.random.seed(seed % 2**32)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


class FlowerTask(Task):
    name: ClassVar[str] = "flower"
    models: ClassVar[tuple[str, ...]] = ("flower",)
    defaults: ClassVar[dict[str, Any]] = {"local_epochs": 1, "batch_size": 32, "lr": 0.1, "weight_decay": 0.0}

    def __init__(self, spec: str, model: str | None = None) -> None:
        super().__init__(model)
        try:
            importlib.import_module("flwr.client")
        except ImportError:
            raise ValueError("task 'flower:...' needs Flower: pip install 'fedcore[flower]'") from None
        self.spec = spec
        self.client_fn = load_client_fn(spec)
        self.app = self.client_fn if flower_app.is_client_app(self.client_fn) else None  # Message API
        self.initial: str | None = None  # [task] initial: where a ClientApp's model comes from
        self._contexts: dict[tuple[int, int], Any] = {}

    def configure(self, job: Mapping[str, Any]) -> None:
        initial = job.get("initial")
        self.initial = str(initial) if initial else None

    def context(self, partition_id: int, num_partitions: int) -> Any:
        """Node `partition_id + 1`'s Flower Context (kept, as Flower keeps it per node)."""
        key = (partition_id, num_partitions)
        if key not in self._contexts:
            self._contexts[key] = new_context(partition_id, num_partitions)
        return self._contexts[key]

    def client(self, context: Any) -> Any:
        """A fresh Flower `Client` from client_fn, as Flower builds one per message."""
        from flwr.client import Client, NumPyClient

        client = self.client_fn(context)
        if isinstance(client, NumPyClient):
            client = client.to_client()
        if not isinstance(client, Client):
            raise ValueError(
                f"{self.spec} returned {type(client).__name__}, not a Flower NumPyClient or Client"
            )
        return client

    def initial_parameters(self, seed: int) -> Arrays:
        from flwr.common import GetParametersIns, parameters_to_ndarrays

        seed_globals(seed)
        if self.app is not None:
            if self.initial is None:
                raise ValueError(
                    f'task flower:{self.spec} is a ClientApp: set [task] initial = "MODULE:FUNC"'
                )
            initial = flower_app.load_initial(self.initial)
            return to_named(initial) if isinstance(initial, list) else initial
        client = self.client(new_context(0, 1))  # a live site's Context stays untouched
        res = client.get_parameters(GetParametersIns(config={}))
        _check_status(res, "get_parameters")
        return to_named(parameters_to_ndarrays(res.parameters))

    def site_data(self, uri: str, *, partition: str, seed: int, partitions: int) -> SiteData:
        if not uri.startswith("builtin:"):
            raise ValueError(
                f"task flower:{self.spec} takes data builtin:K/N (Flower partition K-1 of N), not {uri!r}"
            )
        k, n = parse_builtin_uri(uri, partitions)
        return SiteData(train=FlowerPartition(_EMPTY, _EMPTY, partition_id=k, num_partitions=n))

    def test_data(self, *, seed: int, partitions: int) -> Dataset | None:
        return None

    def site_state(self, data: SiteData) -> bytes | None:
        """The node's `Context.state`, which Flower keeps for the whole run, in Flower's own
        protobuf encoding (flwr.common.serde)."""
        from flwr.common.serde import recorddict_to_proto

        part = _partition(data.train)
        state = self.context(part.partition_id, part.num_partitions).state
        return bytes(recorddict_to_proto(state).SerializeToString()) if len(state) else None

    def restore_site_state(self, data: SiteData, state: bytes | None) -> None:
        from flwr.app import RecordDict
        from flwr.common.serde import recorddict_from_proto
        from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

        part = _partition(data.train)
        restored = RecordDict()
        if state is not None:
            restored = recorddict_from_proto(ProtoRecordDict.FromString(state))
        self.context(part.partition_id, part.num_partitions).state = restored

    def fit(self, parameters: Arrays, data: SiteData, settings: TrainSettings) -> FitOutcome:
        from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays

        part = _partition(data.train)
        config: dict[str, bool | bytes | float | int | str] = {
            "local_epochs": settings.local_epochs,
            "batch_size": settings.batch_size,
            "lr": settings.lr,
            "weight_decay": settings.weight_decay,
            "proximal_mu": settings.proximal_mu,
            "seed": settings.seed,
            "server_round": settings.round,
        }
        seed_globals(settings.seed)
        context = self.context(part.partition_id, part.num_partitions)
        if self.app is not None:
            arrays, examples, metrics = flower_app.train(
                self.app,
                context,
                part.partition_id + 1,
                settings.round,
                parameters,
                {k: v for k, v in config.items() if k != "server_round"},
            )
            return FitOutcome(arrays, examples, metrics)
        client = self.client(context)
        res = client.fit(FitIns(ndarrays_to_parameters(to_list(parameters)), config))
        _check_status(res, "fit")
        metrics = {
            k: float(v)
            for k, v in res.metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        return FitOutcome(to_named(parameters_to_ndarrays(res.parameters)), int(res.num_examples), metrics)

    def evaluate(self, parameters: Arrays, data: Dataset) -> Evaluation:
        from flwr.common import EvaluateIns, ndarrays_to_parameters

        part = _partition(data)
        context = self.context(part.partition_id, part.num_partitions)
        if self.app is not None:
            loss, accuracy, examples, named = flower_app.evaluate(
                self.app, context, part.partition_id + 1, 0, parameters
            )
            return Evaluation(loss=loss, accuracy=accuracy, num_examples=examples, metrics=named)
        client = self.client(context)
        res = client.evaluate(EvaluateIns(ndarrays_to_parameters(to_list(parameters)), {}))
        _check_status(res, "evaluate")
        accuracy = res.metrics.get("accuracy")
        if not isinstance(accuracy, int | float) or isinstance(accuracy, bool):
            accuracy = math.nan
        named = {k: float(v) for k, v in res.metrics.items() if flower_app._number(v)}
        return Evaluation(
            loss=float(res.loss), accuracy=float(accuracy), num_examples=int(res.num_examples), metrics=named
        )


def _partition(data: Dataset) -> FlowerPartition:
    if not isinstance(data, FlowerPartition):
        raise ValueError("a flower task's data must come from its site_data (builtin:K/N)")
    return data


def _check_status(res: Any, call: str) -> None:
    from flwr.common import Code

    if res.status.code != Code.OK:
        raise ValueError(f"the Flower client's {call} failed: {res.status.message}")
