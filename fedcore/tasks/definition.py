"""The task API a user writes against: a model factory, a data loader, and optionally the
data the package ships and its own training or evaluation.

    from fedcore.tasks import TaskDefinition

    task = TaskDefinition(
        name="heart",
        model=lambda: torch.nn.Sequential(torch.nn.Linear(13, 2)),  # logits for each class
        load=load_csv,            # a site's file -> (features float32 [n, ...], labels int [n])
        sample=load_sample,       # optional: data shipped with the package (simulate, tests)
        defaults={"local_epochs": 2, "batch_size": 32, "lr": 0.05},
    )

and in the package's pyproject.toml:

    [project.entry-points."fedcore.tasks"]
    heart = "heart_task:task"

Training is fedcore's (cross-entropy SGD), so DP-SGD (Opacus-checked), FedProx, secure
aggregation and every aggregation rule work on the model unchanged. A task that must train
its own way gives `fit(model, data, settings) -> metrics` (and then cannot run DP-SGD
rounds: sites refuse them, since fedcore cannot vouch for its privacy); `evaluate(model,
data) -> (loss, accuracy)` replaces the evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from fedcore.tasks.base import Dataset, Evaluation, FitOutcome, SiteData, TrainSettings
from fedcore.tasks.bundled import BundledTask
from fedcore.tasks.torch_task import to_arrays

Arrays = dict[str, np.ndarray]
DEFAULTS = {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "weight_decay": 0.0}


@dataclass(frozen=True)
class TaskDefinition:
    name: str
    model: Callable[[], nn.Module]  # a freshly initialised model (from torch's global generator)
    load: Callable[[Path], tuple[np.ndarray, np.ndarray]]  # a site's data -> features, labels
    sample: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None  # the package's own data
    defaults: Mapping[str, Any] = field(default_factory=dict)  # local_epochs, batch_size, lr, weight_decay
    fit: Callable[[nn.Module, Dataset, TrainSettings], Mapping[str, float]] | None = None
    evaluate: Callable[[nn.Module, Dataset], tuple[float, float]] | None = None

    def __post_init__(self) -> None:
        if unknown := set(self.defaults) - set(DEFAULTS):
            raise ValueError(
                f"task {self.name!r}: unknown defaults {sorted(unknown)}; known: {sorted(DEFAULTS)}"
            )

    def build(self, model: str | None = None) -> DefinedTask:
        """The Task fedcore runs (the definition names one model, `default`)."""
        kind = type(
            f"DefinedTask[{self.name}]",
            (DefinedTask,),
            {
                "name": self.name,
                "models": ("default",),
                "defaults": {**DEFAULTS, **self.defaults},
                "supports_dp_sgd": self.fit is None,
            },
        )
        task: DefinedTask = kind(self, model)
        return task


class DefinedTask(BundledTask):
    """A `TaskDefinition` run as a task: the sample is the bundled data (20% held out for the
    server, the rest split across virtual sites), a site's `--data PATH` goes to `load`."""

    models: ClassVar[tuple[str, ...]] = ("default",)

    def __init__(self, definition: TaskDefinition, model: str | None = None) -> None:
        super().__init__(model)
        self.definition = definition

    def build_model(self) -> nn.Module:
        return self.definition.model()

    def load_bundled(self) -> Dataset:
        if self.definition.sample is None:
            raise ValueError(f"task {self.name!r} ships no sample data: give each site --data PATH")
        return _dataset(*self.definition.sample(), what=f"task {self.name!r}'s sample")

    def test_data(self, *, seed: int, partitions: int) -> Dataset | None:
        """The sample's held-out split; without a sample the sites evaluate (federated)."""
        return super().test_data(seed=seed, partitions=partitions) if self.definition.sample else None

    def load_file(self, path: Path) -> Dataset:
        if not path.exists():
            raise ValueError(f"data {path} does not exist")
        return _dataset(*self.definition.load(path), what=str(path))

    def fit(self, parameters: Arrays, data: SiteData, settings: TrainSettings) -> FitOutcome:
        if self.definition.fit is None:
            return super().fit(parameters, data, settings)
        model = self._model_from(parameters)
        model.train()
        metrics = dict(self.definition.fit(model, data.train, settings))
        return FitOutcome(to_arrays(model), len(data.train), {k: float(v) for k, v in metrics.items()})

    @torch.no_grad()
    def evaluate(self, parameters: Arrays, data: Dataset) -> Evaluation:
        if self.definition.evaluate is None:
            return super().evaluate(parameters, data)
        model = self._model_from(parameters)
        model.eval()
        loss, accuracy = self.definition.evaluate(model, data)
        return Evaluation(float(loss), float(accuracy), len(data))


def _dataset(x: np.ndarray, y: np.ndarray, *, what: str) -> Dataset:
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what}: labels must be integers (class indices), got {y.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: features must be finite numbers")
    return Dataset(x, y.astype(np.int64))
