"""Tasks on a data set bundled with a dependency: a fixed held-out test split for the
server, the rest partitioned across sites."""

from __future__ import annotations

import abc
import functools
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import numpy as np

from fedcore.seeding import rng
from fedcore.tasks.base import Dataset, SiteData, parse_builtin_uri
from fedcore.tasks.partition import parse_partition, split_indices
from fedcore.tasks.torch_task import TorchClassifierTask

TEST_FRACTION = 0.2
_SPLIT_SEED = 20240229  # the test split belongs to the task, not to an experiment


def stratified_split(data: Dataset, *, seed: int) -> tuple[Dataset, Dataset]:
    """(train, test): TEST_FRACTION of each class held out, drawn with `seed`."""
    generator = np.random.default_rng(seed)
    test = np.concatenate(
        [
            generator.permutation(idx)[: round(TEST_FRACTION * len(idx))]
            for idx in (np.flatnonzero(data.y == c) for c in np.unique(data.y))
        ]
    ).astype(np.int64)
    mask = np.zeros(len(data), dtype=bool)
    mask[test] = True
    return data.subset(np.flatnonzero(~mask)), data.subset(np.sort(test))


class BundledTask(TorchClassifierTask):
    @abc.abstractmethod
    def load_bundled(self) -> Dataset:
        """The whole bundled data set, preprocessed."""

    @cached_property
    def _split(self) -> tuple[Dataset, Dataset]:
        return stratified_split(self.load_bundled(), seed=_SPLIT_SEED)

    @functools.lru_cache(maxsize=8)  # noqa: B019 - tasks live as long as the process
    def _parts(self, n: int, partition: str, seed: int) -> list[np.ndarray]:
        """The training split cut into n parts (virtual sites ask for theirs every round)."""
        return split_indices(self._split[0].y, n, parse_partition(partition), rng(seed, "partition", n))

    def test_data(self, *, seed: int, partitions: int) -> Dataset | None:
        return self._split[1]

    def site_data(self, uri: str, *, partition: str, seed: int, partitions: int) -> SiteData:
        if uri.startswith("builtin:"):
            k, n = parse_builtin_uri(uri, partitions)
            return SiteData(train=self._split[0].subset(self._parts(n, partition, seed)[k]))
        return SiteData(train=self.load_file(Path(uri)))

    def load_file(self, path: Path) -> Dataset:
        raise ValueError(f"task {self.name!r} reads only builtin:K/N data, not {path}")


class OwnDataTask(BundledTask):
    """A task on data each site holds itself (`data_kind`: a file or a folder). A deployed
    site holds out TEST_FRACTION of its own data (stratified, fixed seed) for federated
    evaluation; `simulate --data` splits one file or folder: held out for the server, the
    rest across the virtual sites. A server without data evaluates federatedly."""

    data_kind: ClassVar[str]
    data: Path | None = None  # simulate: the one file or folder split into the virtual sites

    @abc.abstractmethod
    def load_file(self, path: Path) -> Dataset:
        """Every example of a site's file or folder, as the job's schema says."""

    def load_bundled(self) -> Dataset:
        if self.data is None:
            raise ValueError(
                f"task {self.name} has no bundled data: give each site --data {self.data_kind} (simulate: --data)"
            )
        return self.load_file(self.data)

    def test_data(self, *, seed: int, partitions: int) -> Dataset | None:
        return super().test_data(seed=seed, partitions=partitions) if self.data is not None else None

    def site_data(self, uri: str, *, partition: str, seed: int, partitions: int) -> SiteData:
        if uri.startswith("builtin:"):
            return super().site_data(uri, partition=partition, seed=seed, partitions=partitions)
        train, test = stratified_split(self.load_file(Path(uri)), seed=0)
        return SiteData(train=train, test=test)
