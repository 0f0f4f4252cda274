"""`synthetic` / `synthetic:ALPHA,BETA`: FedProx's Synthetic(alpha, beta) (Li et al., MLSys
2020, section 5.1), generated from the seed, one device per site (the `natural` partition).

Device k draws u_k ~ N(0, alpha) and B_k ~ N(0, beta); its labelling model W_k, b_k ~
N(u_k, 1) and its input mean v_k ~ N(B_k, 1); inputs x ~ N(v_k, diag(j^-1.2)) and labels
y = argmax(softmax(W_k x + b_k)); it holds lognormal(4, 2) + 50 examples. Alpha controls how
much the devices' models differ, beta how much their data differ. Each device keeps 80% for
training; the server's test split pools the other 20% of the first TEST_DEVICES devices.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from torch import nn

from fedcore.seeding import rng
from fedcore.tasks.base import Dataset, SiteData, parse_builtin_uri
from fedcore.tasks.partition import PartitionKind, parse_partition
from fedcore.tasks.torch_task import TorchClassifierTask

DIMENSION = 60
CLASSES = 10
TEST_DEVICES = 100
_COV = np.arange(1, DIMENSION + 1, dtype=np.float64) ** -1.2


class Synthetic(TorchClassifierTask):
    name = "synthetic"
    models = ("logreg",)
    defaults: ClassVar[dict[str, Any]] = {
        "local_epochs": 20,
        "batch_size": 10,
        "lr": 0.01,
        "weight_decay": 0.0,
    }
    default_partition = "natural"

    def __init__(
        self, model: str | None = None, *, alpha: float = 1.0, beta: float = 1.0, **kw: object
    ) -> None:
        super().__init__(model, **kw)  # type: ignore[arg-type]
        self.alpha, self.beta = alpha, beta

    def device_data(self, k: int, seed: int) -> tuple[Dataset, Dataset]:
        """Train and test data of device k (0-based), generated from the seed alone."""
        g = rng(seed, "synthetic", self.alpha, self.beta, k)
        u, b_mean = g.normal(0, np.sqrt(self.alpha)), g.normal(0, np.sqrt(self.beta))
        w = g.normal(u, 1, (DIMENSION, CLASSES))
        b = g.normal(u, 1, CLASSES)
        v = g.normal(b_mean, 1, DIMENSION)
        size = int(g.lognormal(4, 2)) + 50
        x = v + g.normal(size=(size, DIMENSION)) * np.sqrt(_COV)
        y = np.argmax(x @ w + b, axis=1)
        cut = int(0.8 * size)
        data = Dataset(x.astype(np.float32), y.astype(np.int64))
        return data.subset(np.arange(cut)), data.subset(np.arange(cut, size))

    def site_data(self, uri: str, *, partition: str, seed: int, partitions: int) -> SiteData:
        if parse_partition(partition).kind is not PartitionKind.NATURAL:
            raise ValueError(
                f"synthetic data has one device per site: use partition 'natural', not {partition!r}"
            )
        if not uri.startswith("builtin:"):
            raise ValueError(f"task 'synthetic' generates its data: use --data builtin:K/N, not {uri!r}")
        k, _ = parse_builtin_uri(uri, partitions)
        train, test = self.device_data(k, seed)
        return SiteData(train=train, test=test)

    def test_data(self, *, seed: int, partitions: int) -> Dataset:
        tests = [self.device_data(k, seed)[1] for k in range(min(partitions, TEST_DEVICES))]
        return Dataset(np.concatenate([t.x for t in tests]), np.concatenate([t.y for t in tests]))

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(DIMENSION, CLASSES))
