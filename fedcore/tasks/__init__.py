"""Learning tasks: the Task contract, built-in tasks and partitioners."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fedcore.config import Experiment, PrivacyMode
from fedcore.tasks import plugins
from fedcore.tasks.base import (
    Dataset,
    Evaluation,
    FitOutcome,
    SiteData,
    Task,
    TaskSpec,
    TrainSettings,
)
from fedcore.tasks.bench import Bench
from fedcore.tasks.breast_cancer import BreastCancer
from fedcore.tasks.definition import TaskDefinition
from fedcore.tasks.digits import Digits
from fedcore.tasks.flower import FlowerTask
from fedcore.tasks.images import Images
from fedcore.tasks.synthetic import Synthetic
from fedcore.tasks.tabular import Tabular

TaskFactory = Callable[[str, str | None], Task]


def _synthetic(arg: str, model: str | None) -> Task:
    if not arg:
        return Synthetic(model)
    try:
        alpha, beta = (float(v) for v in arg.split(","))
    except ValueError:
        raise ValueError(
            f"bad task 'synthetic:{arg}'; expected synthetic:ALPHA,BETA, e.g. synthetic:1,1"
        ) from None
    return Synthetic(model, alpha=alpha, beta=beta)


def _bench(arg: str, model: str | None) -> Task:
    try:
        return Bench(int(arg or 100_000))
    except ValueError:
        raise ValueError(f"bad task 'bench:{arg}'; expected bench:PARAMS, e.g. bench:100000") from None


_REGISTRY: dict[str, TaskFactory] = {
    "bench": _bench,
    "breast_cancer": lambda arg, model: BreastCancer(model),
    "digits": lambda arg, model: Digits(model),
    "images": lambda arg, model: Images(model),  # a folder per class; schema from the job
    "flower": lambda arg, model: FlowerTask(arg, model),  # flower:MODULE:ATTR, a Flower client_fn
    "synthetic": _synthetic,
    "tabular": lambda arg, model: Tabular(model),  # a CSV/Parquet file; schema from the job
}


def register_task(name: str, factory: TaskFactory) -> None:
    """Install a task under `name`; `factory(argument after ':', model)` builds it."""
    _REGISTRY[name] = factory


def build_task(name: str, model: str | None = None) -> Task:
    """The task called `name`: a built-in (`NAME` or `NAME:ARGUMENT`), an installed plug-in
    (entry point group `fedcore.tasks`) or `package.module:attr`; ValueError lists the choices."""
    base, _, arg = name.partition(":")
    if base in _REGISTRY:
        return _REGISTRY[base](arg, model)
    factory = plugins.plugin_factory(name)
    if factory is None:
        raise ValueError(
            f"unknown task {name!r}; installed tasks: {', '.join(installed_tasks())} "
            "(or give package.module:attr)"
        )
    return factory(arg, model)


def task_source(name: str) -> plugins.TaskSource:
    """Where the code that `build_task(name)` runs comes from (what a site approves),
    resolved in build_task's order: built-in (a hosted Flower app: its own package; a
    registered factory: its module), then plug-in."""
    base, _, arg = name.partition(":")
    if base == "flower" and arg:  # the Flower app's code (bare `flower`: the host, fedcore)
        return plugins.module_source(name, arg.partition(":")[0], "flower app")
    if base in _REGISTRY:
        module = _REGISTRY[base].__module__
        origin = "built-in" if module.partition(".")[0] == "fedcore" else "registered"
        return plugins.module_source(base, module, origin)
    return plugins.plugin_source(name)


def task_for(experiment: Experiment) -> Task:
    """The experiment's task, configured with the job's task settings."""
    task = build_task(experiment.task.name, experiment.task.model)
    task.configure(job_settings(experiment))
    return task


def max_examples_per_site(experiment: Experiment, task: Task) -> int:
    """The public bound on the example count one site's update weighs: the job's, else the task's."""
    return experiment.federation.max_examples_per_site or task.max_examples_per_site


def with_task_defaults(experiment: Experiment) -> Experiment:
    """The experiment with its task's private defaults (`Task.private_defaults`) for what a
    sample-level DP job leaves unset: DP-SGD learns best with another recipe (a smaller
    model, full-batch steps at a large learning rate, averaged iterates) than plain SGD."""
    if experiment.privacy.mode is not PrivacyMode.SAMPLE:
        return experiment
    try:
        defaults = build_task(experiment.task.name).private_defaults
    except ValueError:
        return experiment  # an unknown task: the caller's own check says so
    unset = {
        "task__model": ("model", experiment.task.model),
        "task__lr": ("lr", experiment.task.lr),
        "strategy__average": ("average", experiment.strategy.average),
    }
    chosen = {
        key: defaults[name] for key, (name, value) in unset.items() if value is None and name in defaults
    }
    return experiment.override(**chosen) if chosen else experiment


def job_settings(experiment: Experiment, *, sites: bool = False) -> dict[str, Any]:
    """The `[task]` settings a task needs (Task.configure): where its model comes from and
    the data schema. `sites`: those sent to sites in the Welcome (not the simulation's data)."""
    t = experiment.task
    settings: dict[str, Any] = {
        "model": t.model,
        "initial": t.initial,
        "classes": json.dumps(list(t.classes)) if t.classes is not None else None,
        "image_size": json.dumps(list(t.image_size)) if t.image_size is not None else None,
        "channels": t.channels,
        "label": t.label,
        "columns": json.dumps(list(t.columns)) if t.columns is not None else None,
        "categories": json.dumps({k: list(v) for k, v in t.categories.items()}) if t.categories else None,
        "ranges": json.dumps({k: list(v) for k, v in t.ranges.items()}) if t.ranges else None,
        "standardise": t.standardise.value if t.name.partition(":")[0] == "tabular" else None,
        "data": None if sites else t.data,
    }
    return {k: v for k, v in settings.items() if v is not None}


def installed_tasks() -> list[str]:
    """Built-in and plug-in task names."""
    return sorted({*_REGISTRY, *plugins.entry_points()})


def default_partition(task: Task) -> str:
    return str(getattr(task, "default_partition", "dirichlet:0.5"))


__all__ = [
    "Dataset",
    "Evaluation",
    "FitOutcome",
    "SiteData",
    "Task",
    "TaskDefinition",
    "TaskSpec",
    "TrainSettings",
    "build_task",
    "default_partition",
    "installed_tasks",
    "job_settings",
    "register_task",
    "task_for",
    "task_source",
]
