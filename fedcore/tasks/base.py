"""The Task contract: what a site and the server must know about a learning problem.

No code travels over the network: a site runs only tasks installed on it, and the job names
one. A task builds the model (as named numpy arrays, the framework's currency), loads a
site's data, trains for a round and evaluates. Everything is seeded by the caller.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from fedcore.privacy.dpsgd import SampleDP
from fedcore.tensors import Arrays


@dataclass(frozen=True)
class TrainSettings:
    """One round of local work, as the server asks for it (the site may lower, never raise)."""

    local_epochs: int
    batch_size: int
    lr: float
    seed: int  # derived from (experiment seed, round, site): data order
    proximal_mu: float = 0.0  # FedProx: mu/2 * ||w - w_global||^2 added to the local loss
    weight_decay: float = 0.0  # L2 penalty on the local objective
    round: int = 0  # the server's round number (Flower clients read it as server_round)
    dp: SampleDP | None = None  # sample-level DP-SGD (after the site's privacy policy)
    secure_rng: bool = True  # DP noise and sampling from the OS's secure source (False: tests only)


@dataclass(frozen=True)
class Dataset:
    """A labelled data set held in memory."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} inputs but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> Dataset:
        return Dataset(self.x[index], self.y[index])


@dataclass(frozen=True)
class SiteData:
    """What one site trains on and, for federated evaluation, evaluates on."""

    train: Dataset
    test: Dataset | None = None


@dataclass(frozen=True)
class FitOutcome:
    parameters: Arrays
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)  # the task's own, by its own names


@dataclass(frozen=True)
class TaskSpec:
    """What the server tells sites about the run's task (sent in the Welcome message)."""

    name: str
    model: str
    partition: str
    seed: int
    partitions: int  # how many parts `builtin:K/N` data is cut into when N is not given
    package: str = ""  # the code the job was built with (fedcore.tasks.plugins.TaskSource)
    version: str = ""
    code_hash: str = ""

    job: Mapping[str, Any] = field(default_factory=dict)  # the task's job settings (Task.configure)

    def as_config(self) -> dict[str, Any]:
        config = {k: getattr(self, k) for k in ("model", "partition", "seed", "partitions")}
        return {**config, **{JOB_PREFIX + k: v for k, v in self.job.items()}}


JOB_PREFIX = "job."  # a Welcome's task_config keys that carry Task.configure settings


SITE_ONLY = frozenset({"data", "features"})  # a site's own choices: which file, which columns


def job_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The Task.configure settings in a Welcome's task_config, less what only the site
    decides (a server that named a path would make the site read a file of its choosing)."""
    return {
        key: v
        for k, v in config.items()
        if k.startswith(JOB_PREFIX) and (key := k.removeprefix(JOB_PREFIX)) not in SITE_ONLY
    }


class Task(abc.ABC):
    """A learning problem. Subclasses set `name`, `models` (the first is the default) and
    `defaults` (local_epochs, batch_size, lr, weight_decay)."""

    name: ClassVar[str]
    models: ClassVar[tuple[str, ...]]
    defaults: ClassVar[dict[str, Any]]
    # What a sample-level DP job gets for what it leaves unset: "model", "lr" ([task]) and
    # "average" ([strategy]); DP-SGD's best recipe is not the plain one (see `with_task_defaults`).
    private_defaults: ClassVar[dict[str, Any]] = {}
    # The default public bound on one site's example count ([federation] max_examples_per_site).
    max_examples_per_site: ClassVar[int] = 100_000
    supports_dp_sgd: ClassVar[bool] = False  # fit() honours TrainSettings.dp
    # What the model takes, for people and exported models (e.g. "N x 1 x 8 x 8, pixels / 16").
    input_description: ClassVar[str] = "N x features, float32, as the task's loader prepares them"

    def __init__(self, model: str | None = None) -> None:
        model = model or self.models[0]
        if model not in self.models:
            raise ValueError(f"task {self.name!r} has no model {model!r}; choose one of {list(self.models)}")
        self.model = model

    def use_model(self, model: str) -> None:
        """Build the job's model from now on (a site learns it from the job)."""
        if model not in self.models:
            raise ValueError(f"task {self.name!r} has no model {model!r}; choose one of {list(self.models)}")
        self.model = model

    @abc.abstractmethod
    def initial_parameters(self, seed: int) -> Arrays:
        """The global model before round 1."""

    @abc.abstractmethod
    def site_data(self, uri: str, *, partition: str, seed: int, partitions: int) -> SiteData:
        """Load a site's data. `builtin:K/N` is part K (1-based) of N of the bundled data,
        split by `partition` with `seed`; other URIs are task-specific (e.g. a CSV path)."""

    @abc.abstractmethod
    def test_data(self, *, seed: int, partitions: int) -> Dataset | None:
        """The server's held-out split for the global model, or None (federated evaluation)."""

    @abc.abstractmethod
    def fit(self, parameters: Arrays, data: SiteData, settings: TrainSettings) -> FitOutcome:
        """Train from `parameters` on the site's data; return the new parameters."""

    @abc.abstractmethod
    def evaluate(self, parameters: Arrays, data: Dataset) -> Evaluation:
        """Loss and accuracy of `parameters` on `data`."""

    def configure(self, job: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        """The job's task settings that the task itself needs (e.g. `initial`, where a
        model comes from); every party calls it before `initial_parameters`."""

    # Federated statistics: a vector every site computes on its training data and the server
    # sums (secure-summed under secure aggregation, noised under DP) before round 1; every
    # party then calls `use_statistics` with the sum (e.g. to standardise features).
    def statistics_size(self) -> int:
        """Length of the task's statistics vector; 0: the task needs none."""
        return 0

    def statistics_sensitivity(self) -> float | None:
        """Largest L2 change of `statistics()` from adding or removing one record (None:
        unbounded, so it cannot be released with DP noise)."""
        return None

    def statistics(self, data: Dataset) -> np.ndarray:
        """This site's statistics vector (float64, `statistics_size()` long)."""
        raise NotImplementedError(f"task {self.name!r} has no federated statistics")

    def use_statistics(self, total: np.ndarray) -> None:  # noqa: B027 - optional hook
        """The federation's summed statistics (called before `fit` or `evaluate`)."""

    def preprocessing(self) -> dict[str, Any]:
        """What raw input needs before the model takes it, for an exported model's metadata
        (JSON-able; {} when `input_description` says it all)."""
        return {}

    def site_state(self, data: SiteData) -> bytes | None:
        """What this site must remember between rounds, encoded (never pickled: it is saved
        with a simulation's checkpoint), or None. A simulation rebuilds its virtual sites
        every round: it keeps this (only for sites that have some) and hands it back through
        `restore_site_state` the next time the site is built."""
        return None

    def restore_site_state(self, data: SiteData, state: bytes | None) -> None:  # noqa: B027 - optional hook
        """Give a rebuilt site what `site_state` returned last time (None: a fresh site)."""


def parse_builtin_uri(uri: str, partitions: int) -> tuple[int, int]:
    """`builtin:K/N` (or `builtin:K`, N = `partitions`) -> (K - 1, N); ValueError if malformed."""
    body = uri.removeprefix("builtin:")
    part, _, total = body.partition("/")
    try:
        k, n = int(part), int(total) if total else partitions
    except ValueError:
        raise ValueError(f"bad data URI {uri!r}; expected builtin:K/N, e.g. builtin:1/3") from None
    if not 1 <= k <= n:
        raise ValueError(f"bad data URI {uri!r}: K must be in 1..N")
    return k - 1, n
